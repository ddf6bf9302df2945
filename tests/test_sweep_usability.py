"""What a user pasting the docs' Python hits: a script without the ``__main__`` guard gets one clear error
instead of silently failed points, and ``load_table`` refuses a sweep with no finished point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpquant_sim.errors import RunFolderError
from dpquant_sim.sweep.collect import load_table
from dpquant_sim.sweep.runner import run_sweep
from tests.test_sweep_runner import _cfg, fake_point

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from dpquant_sim.sweep.runner import run_sweep
from tests.test_sweep_runner import _cfg, fake_point
{call}
"""
CALL = 'res = run_sweep(_cfg(), "out", workers=2, point_fn=fake_point, progress=False); print("finished", len(res.finished))'


def _script(tmp_path: Path) -> subprocess.CompletedProcess:
    """A script calling run_sweep(workers=2) at module level, without the ``__main__`` guard."""
    (tmp_path / "s.py").write_text(SCRIPT.format(root=str(ROOT), call=CALL))
    return subprocess.run([sys.executable, "s.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180)


@pytest.mark.slow  # two spawned workers, each importing pandas and the package
def test_a_script_without_the_main_guard_fails_with_one_clear_error(tmp_path):
    bad = _script(tmp_path)
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("dpquant_sim.sweep.executors.WorkersDidNotStart: the sweep's worker processes died while "
                           "starting, before running any point"), bad.stderr[-2000:]
    assert 'if __name__ == "__main__":' in last
    # Each worker says why itself (instead of "sweep folder in use", what its own run_sweep used to hit).
    assert "run_sweep was called while a worker process imported the main script" in bad.stderr
    assert "is in use by" not in bad.stderr
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())
    # The same script with the guard: tests/test_docs_snippets.py runs docs/usage.md's guarded run_sweep(workers=2).


def always_fails(config, run_dir):
    raise RuntimeError("planted failure")


def test_load_table_refuses_a_sweep_without_finished_points(tmp_path, monkeypatch):
    with pytest.raises(RunFolderError, match=r"has no results table \(results.csv\)"):
        load_table(tmp_path)
    res = run_sweep(_cfg(), tmp_path, workers=1, point_fn=always_fails, progress=False)
    assert len(res.failed) == 3 and len(res.table) == 0
    bad = res.points[0].id
    with pytest.raises(RunFolderError, match=r"results table is empty because no point of the sweep has finished "
                                             r"\(3 points: 0 finished, 3 failed \(traceback in runs/\w{12}/error.txt"
                                             r"\), 0 not run\)"):
        load_table(tmp_path)
    # Two points finish on a rerun (the schedule kind 'random' still fails): the table holds them, with a warning.
    monkeypatch.setenv("DPQ_FAKE_FAIL_KIND", "random")
    res = run_sweep(_cfg(), tmp_path, workers=1, point_fn=fake_point, progress=False)
    assert len(res.finished) == 2 and len(res.failed) == 1 and bad in res.finished
    with pytest.warns(UserWarning, match=r"holds the finished points only \(3 points: 2 finished, 1 failed"):
        t = load_table(tmp_path)
    assert t["point_id"].nunique() == 2


def record_threads(config, run_dir):
    """A point that imports torch (first import in a pool worker) and records its intra-op thread count."""
    import torch

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "threads.txt").write_text(str(torch.get_num_threads()))
    fake_point(config, run_dir)


@pytest.mark.slow  # two spawned workers importing torch
def test_pool_workers_train_with_threads_per_worker(tmp_path):
    """The workers no longer import torch up front: torch, imported by the point, still gets
    ``threads_per_worker`` threads (from OMP_NUM_THREADS, set before)."""
    res = run_sweep(_cfg(executor={"kind": "local", "workers": 2, "threads_per_worker": 1}), tmp_path, workers=2,
                    point_fn=record_threads, progress=False, collect=False)
    assert res.ok
    assert {(tmp_path / "runs" / p.id / "threads.txt").read_text() for p in res.points} == {"1"}
