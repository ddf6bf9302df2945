"""Sweep runner end to end: process pool, skip finished points, failures, kill + resume, tidy table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from dpquant_sim.errors import RunFolderError
from dpquant_sim.sweep.collect import collect_sweep, load_table
from dpquant_sim.sweep.config import SweepConfig
from dpquant_sim.sweep.runner import run_sweep

ROOT = Path(__file__).resolve().parent.parent
ACCELS = ["h100_sxm", "b200"]
RAW = {
    "name": "tiny",
    "base": {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 64, "epsilon": 8, "recipe": "fp4"},
    "grid": {"schedule": [{"kind": "fp32"}, {"kind": "static-all"}, {"kind": "random"}], "budget": [0.5]},
    "accelerators": ACCELS,
}


def fake_point(config, run_dir: Path) -> None:
    """A deterministic stand-in for training.engine.train: writes a complete run dir of the same layout
    (config.yaml, run_info.json for the mlp on digits, metrics.csv with plans, summary.json last)."""
    from dpquant_sim.io import atomic_write_df, atomic_write_json, atomic_write_text

    run_dir = Path(run_dir)
    if os.environ.get("DPQ_FAKE_FAIL_KIND") == config.schedule.kind:
        raise RuntimeError(f"planted failure for {config.schedule.kind}")
    delay = float(os.environ.get("DPQ_FAKE_DELAY", "0"))
    if str(config.seed) == os.environ.get("DPQ_FAKE_SLOW_SEED"):  # points that cannot finish before a kill
        delay = float(os.environ.get("DPQ_FAKE_SLOW_DELAY", "30"))
    if (run_dir / "summary.json").is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    layers = ["fc1", "fc2", "head"]
    atomic_write_json(
        run_dir / "run_info.json",
        {"model": "mlp", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "n_train": 1437,
         "batch_size": config.batch_size, "sample_rate": config.batch_size / 1437, "steps_per_epoch": 22,
         "private": True},
    )
    kind = config.schedule.kind
    rows = []
    for e in range(config.epochs):
        time.sleep(delay)
        q = {} if kind == "fp32" else ({n: config.recipe for n in layers} if kind == "static-all" else
                                       {layers[(e + config.seed) % 3]: config.recipe})
        rows.append({"epoch": e, "train_loss": 1.0 / (e + 1), "test_loss": 1.0, "test_acc": 0.5 + 0.1 * e
                     - 0.05 * len(q), "epsilon": 4.0 * (e + 1), "plan": json.dumps({"epoch": e, "quantized": q})})
        atomic_write_df(run_dir / "metrics.csv", pd.DataFrame(rows))
    atomic_write_json(run_dir / "summary.json", {"complete": True, "test_acc": rows[-1]["test_acc"]})


def _cfg(**over) -> SweepConfig:
    return SweepConfig.from_dict({**RAW, **over})


def test_tiny_sweep_pool_table_and_skip(tmp_path):
    res = run_sweep(_cfg(), tmp_path, workers=2, point_fn=fake_point, progress=False)
    assert res.ok and len(res.finished) == 3 and not res.skipped
    t = res.table
    # runs x epochs x accelerators
    assert len(t) == 3 * 2 * len(ACCELS)
    assert set(t["accelerator"]) == set(ACCELS)
    assert {"point_id", "schedule_kind", "epoch", "test_acc", "time_theoretical_s"} <= set(t.columns)
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.parquet").is_file()
    pd.testing.assert_frame_equal(load_table(tmp_path).reset_index(drop=True), t, check_dtype=False)
    # A rerun skips every point and rebuilds the identical table.
    mtimes = {p: (tmp_path / "runs" / p / "summary.json").stat().st_mtime_ns for p in res.finished}
    res2 = run_sweep(_cfg(), tmp_path, workers=2, point_fn=fake_point, progress=False)
    assert sorted(res2.skipped) == sorted(res.finished) and not res2.finished
    assert {p: (tmp_path / "runs" / p / "summary.json").stat().st_mtime_ns for p in res.finished} == mtimes
    pd.testing.assert_frame_equal(res2.table, t)


def test_failing_point_is_reported_kept_and_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("DPQ_FAKE_FAIL_KIND", "random")
    res = run_sweep(_cfg(), tmp_path, workers=1, point_fn=fake_point, progress=False)
    assert len(res.failed) == 1 and len(res.finished) == 2
    pid = next(iter(res.failed))
    assert "planted failure" in (tmp_path / "runs" / pid / "error.txt").read_text()
    assert res.table["point_id"].nunique() == 2  # only finished runs are collected
    monkeypatch.delenv("DPQ_FAKE_FAIL_KIND")
    res2 = run_sweep(_cfg(), tmp_path, workers=1, point_fn=fake_point, progress=False)
    assert res2.finished == [pid] and len(res2.skipped) == 2 and res2.ok
    assert not (tmp_path / "runs" / pid / "error.txt").exists()
    assert res2.table["point_id"].nunique() == 3


def test_kill_mid_sweep_then_resume_gives_same_table(tmp_path):
    """SIGKILL a sweep process after its first point finished; rerun; the table equals an uninterrupted run."""
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from tests.test_sweep_runner import fake_point, _cfg
        from dpquant_sim.sweep.runner import run_sweep
        run_sweep(_cfg(), {str(out)!r}, workers=1, point_fn=fake_point, progress=False, collect=False)
        """
    )
    env = {**os.environ, "DPQ_FAKE_DELAY": "1.0"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("runs/*/summary.json")):
            assert proc.poll() is None, "sweep process ended before it could be killed"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done_before = {p.parent.name for p in out.glob("runs/*/summary.json")}
    assert len(done_before) >= 1 and len(done_before) < 3
    kept = {p: (out / "runs" / p / "metrics.csv").read_bytes() for p in done_before}
    res = run_sweep(_cfg(), out, workers=1, point_fn=fake_point, progress=False)
    assert set(res.skipped) == done_before and res.ok
    assert {p: (out / "runs" / p / "metrics.csv").read_bytes() for p in done_before} == kept
    clean = run_sweep(_cfg(), tmp_path / "clean", workers=1, point_fn=fake_point, progress=False)
    pd.testing.assert_frame_equal(res.table, clean.table)


def test_real_engine_tiny_sweep(tmp_path):
    """2 points, 1 epoch, mlp on digits, through training.engine.train and cost_run."""
    cfg = _cfg(base={**RAW["base"], "epochs": 1}, grid={"schedule": [{"kind": "fp32"}, {"kind": "random"}],
                                                        "budget": [0.5]})
    res = run_sweep(cfg, tmp_path, workers=1, progress=False)
    assert res.ok, res.failed
    t = res.table
    assert t["point_id"].nunique() == 2 and len(t) == 2 * len(ACCELS)
    assert (t["epsilon"] <= 8.0 + 1e-9).all() and t["test_acc"].between(0, 1).all()
    fp32 = t[t["schedule_kind"] == "fp32"]
    # The fp32 run quantizes nothing: its theoretical speedup over bf16 is exactly 1.
    assert fp32["speedup_vs_bf16_theoretical"].to_numpy() == pytest.approx(1.0)
    again = collect_sweep(tmp_path, accelerators=ACCELS)
    pd.testing.assert_frame_equal(again, t)


def test_cli_dry_run_and_bad_config(tmp_path):
    from dpquant_sim.cli import main

    ok = tmp_path / "s.yaml"
    ok.write_text("base: {dataset: digits, model: mlp, epochs: 1}\ngrid: {seed: [0, 1]}\naccelerators: [b200]\n")
    from typer.testing import CliRunner

    from dpquant_sim.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["sweep", str(ok), "--out", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "2 points" in r.output and r.output.count("todo") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {seeds: [0]}\n")
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ integrity
def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_parent_only(proc, started, timeout=120):
    """Wait until ``started()`` and the pool's workers are up, SIGKILL the sweep process alone (not its group:
    that is what an OOM killer or `kill -9 PID` does); return the worker pids."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "sweep process ended before it could be killed"
        workers = {c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)}
        if len(workers) >= 2 and started():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the pool did not start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return workers


def _no_survivors(workers, within=10.0):
    deadline = time.time() + within
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    return [w for w in workers if _alive(w)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_sweep_leaves_no_worker_and_reruns_to_the_same_table(tmp_path):
    """Reproducer: after SIGKILL of the sweep process its pool workers were re-parented to init and kept
    training queued points, racing a rerun. Now they die with it; the rerun equals an uninterrupted sweep."""
    out = tmp_path / "killed"
    cfg = _cfg(grid={**RAW["grid"], "seed": [0, 1]})  # 6 points, 2 workers
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from tests.test_sweep_runner import fake_point, _cfg, RAW
        from dpquant_sim.sweep.runner import run_sweep
        run_sweep(_cfg(grid={{**RAW["grid"], "seed": [0, 1]}}), {str(out)!r}, workers=2, point_fn=fake_point,
                  progress=False, collect=False)
        """
    )
    # seed-1 points sleep 30 s per epoch, so however loaded the machine, the kill (after the first finished
    # point) finds unfinished points
    proc = subprocess.Popen([sys.executable, "-c", script],
                            env={**os.environ, "DPQ_FAKE_DELAY": "0.5", "DPQ_FAKE_SLOW_SEED": "1"})
    try:
        workers = _kill_parent_only(proc, lambda: bool(list(out.glob("runs/*/summary.json"))))
    finally:
        if proc.poll() is None:
            proc.kill()
    survivors = _no_survivors(workers)
    for w in survivors:  # do not leak them into the rest of the suite
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived the sweep process"
    done = {p.parent.name for p in out.glob("runs/*/summary.json")}
    assert 1 <= len(done) < 6, done
    res = run_sweep(cfg, out, workers=1, point_fn=fake_point, progress=False)
    assert res.ok and set(res.skipped) == done and len(res.finished) == 6 - len(done), (res, done)
    clean = run_sweep(cfg, tmp_path / "clean", workers=1, point_fn=fake_point, progress=False)
    pd.testing.assert_frame_equal(res.table, clean.table)
    assert not [p for p in out.rglob("*") if p.name == ".lock" or p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_of_a_pool_sweep_stops_every_worker_cleanly(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the workers ignore it, the sweep process
    terminates them, they unwind (nothing half-written is left) and exit; the rerun completes the same table."""
    out = tmp_path / "interrupted"
    cfg = _cfg(grid={**RAW["grid"], "seed": [0, 1]})
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from tests.test_sweep_runner import fake_point, _cfg, RAW
        from dpquant_sim.sweep.runner import run_sweep
        run_sweep(_cfg(grid={{**RAW["grid"], "seed": [0, 1]}}), {str(out)!r}, workers=2, point_fn=fake_point,
                  progress=False, collect=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "DPQ_FAKE_DELAY": "0.5"},
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (len(_children(proc.pid)) >= 3 and list(out.glob("runs/*/summary.json"))):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        workers = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert err.count("Traceback") == 1, err  # the sweep process's own; none from the workers
    survivors = _no_survivors(workers)
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    res = run_sweep(cfg, out, workers=1, point_fn=fake_point, progress=False)
    clean = run_sweep(cfg, tmp_path / "clean", workers=1, point_fn=fake_point, progress=False)
    pd.testing.assert_frame_equal(res.table, clean.table)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_real_sweep_reruns_to_identical_results(tmp_path):
    """The fault-injection check through the CLI and the real engine: `dpquant-sim sweep` (2 workers, 4 tiny
    points) is SIGKILLed once a run has checkpointed an epoch; no worker survives 10 s; the rerun's table equals
    an uninterrupted sweep's (wall-clock columns aside), bit for bit."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: kill\nbase: {dataset: digits, model: mlp, n_train: 200, n_test: 100, batch_size: 50, epochs: 3,\n"
        "       noise_multiplier: 1.0, recipe: fp4}\n"
        "grid: {schedule: [{kind: fp32}, {kind: random}], budget: [0.5], seed: [0, 1]}\n"
        "accelerators: [h100_sxm]\nexecutor: {kind: local, workers: 2}\n")
    out = tmp_path / "killed"
    cli = [sys.executable, "-m", "dpquant_sim", "sweep", str(sweep), "-q", "--out"]
    proc = subprocess.Popen([*cli, str(out)])
    try:
        workers = _kill_parent_only(proc, lambda: bool(list(out.glob("runs/*/checkpoint.pt"))), timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    survivors = _no_survivors(workers)
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived the sweep process"
    assert len(list(out.glob("runs/*/summary.json"))) < 4
    cfg = SweepConfig.from_yaml(sweep)  # rerun and reference in this process (no second pool start-up)
    res = run_sweep(cfg, out, workers=1, progress=False)
    clean = run_sweep(cfg, tmp_path / "clean", workers=1, progress=False)
    assert res.ok and clean.ok and res.finished
    wall = ["wall_s", "wall_s_total"]
    pd.testing.assert_frame_equal(res.table.drop(columns=wall), clean.table.drop(columns=wall), check_exact=True)
    assert not [p for p in out.rglob("*") if p.name == ".lock" or p.name.endswith(".tmp")]


def test_a_folder_holds_one_sweep(tmp_path):
    """Reproducer: rerunning a finished sweep folder with another sweep.yaml was accepted and orphaned its runs."""
    res = run_sweep(_cfg(), tmp_path, workers=1, point_fn=fake_point, progress=False)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    other = _cfg(base={**RAW["base"], "epochs": 3})
    with pytest.raises(RunFolderError, match=r"holds another sweep \(base.epochs: 2 there, 3 here\)"):
        run_sweep(other, tmp_path, workers=1, point_fn=fake_point, progress=False)
    with pytest.raises(RunFolderError, match=r"accelerators: \['h100_sxm', 'b200'\] there, \['b200'\] here"):
        run_sweep(_cfg(accelerators=["b200"]), tmp_path, workers=1, point_fn=fake_point, progress=False)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    # executor settings may change
    again = run_sweep(_cfg(executor={"kind": "local", "workers": 2, "threads_per_worker": 2}), tmp_path,
                      point_fn=fake_point, progress=False)
    assert sorted(again.skipped) == sorted(res.finished)
    # a folder of run dirs without its sweep.yaml still refuses points it does not hold
    (tmp_path / "sweep.yaml").unlink()
    with pytest.raises(RunFolderError, match=r"holds 3 run dir\(s\) that are not points of this sweep"):
        run_sweep(other, tmp_path, workers=1, point_fn=fake_point, progress=False)
    # through the CLI: one line, exit 2
    from dpquant_sim.cli import main

    (tmp_path / "other.yaml").write_text(other.to_yaml())
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(tmp_path / "other.yaml"), "--out", str(tmp_path), "-q"])
    assert e.value.code == 2


def test_a_second_sweep_process_is_refused(tmp_path):
    from tests.test_locking import _hold

    holder = _hold(tmp_path / "s")
    try:
        with pytest.raises(RunFolderError, match=rf"sweep folder '.*s' is in use by process {holder.pid} "):
            run_sweep(_cfg(), tmp_path / "s", workers=1, point_fn=fake_point, progress=False)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run_sweep(_cfg(), tmp_path / "s", workers=1, point_fn=fake_point, progress=False).ok


def test_collect_refuses_a_metrics_csv_that_disagrees_with_summary(tmp_path):
    """Reproducer: a hand-edited metrics.csv was tabulated over summary.json."""
    res = run_sweep(_cfg(), tmp_path, workers=1, point_fn=fake_point, progress=False, collect=False)
    rd = tmp_path / "runs" / res.finished[0]
    m = pd.read_csv(rd / "metrics.csv")
    m.loc[len(m) - 1, "test_acc"] = 0.99
    m.to_csv(rd / "metrics.csv", index=False)
    with pytest.raises(RunFolderError, match=r"metrics.csv disagrees with summary.json \(test_acc=.* in summary"):
        collect_sweep(tmp_path, accelerators=ACCELS)
    # the engine's summary records metrics.csv's SHA-256: any edit is caught, even one the fields miss
    import hashlib
    import json as _json

    m.loc[len(m) - 1, "test_acc"] = _json.loads((rd / "summary.json").read_text())["test_acc"]
    m.loc[0, "train_loss"] = 123.0
    m.to_csv(rd / "metrics.csv", index=False)
    collect_sweep(tmp_path, accelerators=ACCELS)  # the fields agree and there is no hash: accepted
    s = _json.loads((rd / "summary.json").read_text())
    s["metrics_sha256"] = hashlib.sha256(b"the file the run wrote").hexdigest()
    (rd / "summary.json").write_text(_json.dumps(s))
    with pytest.raises(RunFolderError, match="metrics.csv is not the file the run wrote"):
        collect_sweep(tmp_path, accelerators=ACCELS)
    # the case: summary.json says 2/2 epochs, metrics.csv has 1 row
    del s["metrics_sha256"]
    s["epochs_completed"] = 2
    (rd / "summary.json").write_text(_json.dumps(s))
    m.iloc[:1].to_csv(rd / "metrics.csv", index=False)
    with pytest.raises(RunFolderError, match=r"epochs_completed=2 in summary.json, 1 in metrics.csv's rows"):
        collect_sweep(tmp_path, accelerators=ACCELS)
