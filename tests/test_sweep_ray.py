"""The Ray executor on a real Ray cluster: a head and one worker node on this machine, each its own raylet with
its own worker processes (``ray.cluster_utils.Cluster``, the same processes ``ray start --head`` / ``ray start
--address`` run). Sweeps connect to it with ``--address`` like to any existing cluster.

Checked: a sweep on the cluster gives the process pool's table (real training, through the CLI); a point whose
run folder is held by another process waits for it instead of running beside it; killing the worker node in
the middle of a point loses nothing (Ray resubmits the point, the rerun skips everything) and no point ever has
two live attempts at once (each attempt records which earlier attempts of its point were still alive when it
started). Skipped when ray is not installed (``make venv`` installs it; ``pip install "dpquant-sim[ray]"``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from dpquant_sim.sweep.executors import ray_available

ROOT = Path(__file__).resolve().parent.parent

needs_ray = pytest.mark.skipif(
    not ray_available(), reason='ray is not installed (optional extra: pip install "dpquant-sim[ray]")'
)

# Nodes take this machine's own IP: Ray resolves a 127.0.0.1 address to it when a driver connects (a cluster
# bound to the loopback interface alone cannot be joined by address).
NODE_ARGS = {
    "num_cpus": 1,
    "object_store_memory": 100 * 1024 * 1024,  # 100 MiB per node: the tasks pass only configs and paths
    "include_dashboard": False,
}
# Notice a dead node within about 2 s instead of the default 15 s, so the fault test stays short.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process on this machine."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class LockedPoint:
    """``tests.test_sweep_runner.fake_point`` under the run folder's lock (as ``training.engine.train`` takes
    it), sleeping ``delay`` seconds first, and logging every attempt to ``log_dir/<point>.<pid>.json``: pid,
    Ray node, start and end times, and the pids of earlier attempts of the same point still alive at its start
    (all nodes of the test cluster are on this machine, so /proc sees them)."""

    def __init__(self, log_dir: str | Path, delay: float = 0.0):
        self.log_dir = str(log_dir)
        self.delay = delay

    def __call__(self, config, run_dir) -> None:
        from dpquant_sim.io import atomic_write_json
        from dpquant_sim.locking import folder_lock
        from tests.test_sweep_runner import fake_point

        run_dir, log_dir = Path(run_dir), Path(self.log_dir)
        with folder_lock(run_dir):
            earlier = [json.loads(p.read_text()) for p in log_dir.glob(f"{run_dir.name}.*.json")]
            rec = {"point": run_dir.name, "pid": os.getpid(), "node": _node_id(), "start": time.time(),
                   "live_earlier": [a["pid"] for a in earlier if "end" not in a and _alive(a["pid"])]}
            path = log_dir / f"{run_dir.name}.{os.getpid()}.json"
            atomic_write_json(path, rec)
            if not (run_dir / "summary.json").is_file():
                time.sleep(self.delay)
            fake_point(config, run_dir)
            rec["end"] = time.time()
            atomic_write_json(path, rec)


def _point(log_dir: str | Path, delay: float = 0.0) -> LockedPoint:
    """A LockedPoint whose class Ray and pool workers can import: pytest imports this file as the top-level
    module ``test_sweep_ray`` (tests/ on its path), while workers see the repository root (the driver's working
    directory), where it is ``tests.test_sweep_ray``."""
    from tests.test_sweep_ray import LockedPoint as Importable

    return Importable(log_dir, delay)


def _attempts(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log_dir.glob("*.json"))]


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, 1 CPU each; always shut down (and Ray's reaper kills the nodes' processes
    should this process die first)."""
    if not ray_available():
        pytest.skip("ray is not installed")
    from ray.cluster_utils import Cluster

    old = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED",)}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        c = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "_system_config": FAST_HEALTH_CHECKS})
    except Exception as e:  # the environment, not the code under test: say so instead of failing
        pytest.skip(f"a local Ray head node could not start on this machine: {type(e).__name__}: {e}")
    try:
        c.worker = c.add_node(**NODE_ARGS)
        c.wait_for_nodes(timeout=60)
        yield c
    finally:
        c.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ensure_worker(c) -> None:
    if not c.worker_nodes:
        c.worker = c.add_node(**NODE_ARGS)
        c.wait_for_nodes(timeout=60)


DRIVER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_sweep_ray import LockedPoint
    from tests.test_sweep_runner import _cfg

    out, address, log_dir, delay = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    res = run_sweep(_cfg(), out, executor="ray", address=address, point_fn=LockedPoint(log_dir, delay),
                    progress=False)
    print(json.dumps({"finished": res.finished, "skipped": res.skipped, "failed": res.failed}), flush=True)
    """
)


def _driver(out: Path, address: str, log_dir: Path, delay: float) -> subprocess.Popen:
    """A sweep driver in its own process (as a user's script or the CLI would be), attached to ``address``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT), str(out), address, str(log_dir), str(delay)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"sweep driver did not finish in {timeout} s; stderr:\n{err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pool_table(tmp_path_factory) -> pd.DataFrame:
    """The fake-point sweep on the local process pool (2 spawned workers): the reference table."""
    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_sweep_runner import _cfg

    tmp = tmp_path_factory.mktemp("pool")
    res = run_sweep(_cfg(), tmp / "pool", workers=2, point_fn=_point(tmp / "log"), progress=False)
    assert res.ok and len(res.finished) == 3
    return res.table


def _table(out: Path) -> pd.DataFrame:
    from dpquant_sim.sweep.collect import load_table

    return load_table(out)


@needs_ray
@pytest.mark.slow  # starts a local Ray instance: 10-30 s on 2 cores
def test_ray_without_address_starts_its_own_instance(tmp_path):
    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_sweep_runner import _cfg, fake_point

    ray_res = run_sweep(_cfg(), tmp_path / "ray", executor="ray", workers=2, point_fn=fake_point, progress=False)
    assert ray_res.ok and len(ray_res.finished) == 3
    local = run_sweep(_cfg(), tmp_path / "local", workers=1, point_fn=fake_point, progress=False)
    pd.testing.assert_frame_equal(ray_res.table, local.table)
    # Resume under Ray skips everything (no tasks are submitted).
    again = run_sweep(_cfg(), tmp_path / "ray", executor="ray", workers=2, point_fn=fake_point, progress=False)
    assert len(again.skipped) == 3 and not again.finished
    import ray

    assert not ray.is_initialized()  # the instance it started is shut down again


@needs_ray
@pytest.mark.slow  # real training in a Ray worker (a torch import there) and here
def test_cli_sweep_on_an_existing_cluster_equals_a_local_run(cluster, tmp_path):
    _ensure_worker(cluster)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(textwrap.dedent(
        """
        name: ray-cli
        base: {dataset: digits, model: mlp, epochs: 1, batch_size: 64, lr: 1.0, private: true, epsilon: 8,
               recipe: fp4, n_train: 256}
        grid:
          schedule: [{kind: fp32}, {kind: static-all}]
        accelerators: [h100_sxm]
        executor: {kind: local, threads_per_worker: 1}
        """))
    cli = [str(Path(sys.executable).parent / "dpquant-sim"), "sweep", str(sweep), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A relative --out, as users type it: the tasks run elsewhere (other working directory) and must still write
    # into this folder.
    ray_run = subprocess.run(cli + ["--out", "ray", "--executor", "ray", "--address", cluster.address],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    # Reference: the same sweep trained here, one point after another (the fake-point tests below compare
    # with the process pool; a pool of real training adds two torch imports to a slow test for nothing new).
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import run_sweep

    ref = run_sweep(SweepConfig.from_yaml(sweep), tmp_path / "serial", workers=1, progress=False)
    assert ref.ok
    a, b = _table(tmp_path / "ray"), _table(tmp_path / "serial")
    timing = [c for c in a.columns if c.startswith("wall_s")]  # measured run time: the one thing that may differ
    assert len(a) == 2 and a["complete"].all()
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
    # The cluster is still up for the next user: the sweep disconnected without shutting it down.
    cluster.wait_for_nodes(timeout=10)


@needs_ray
@pytest.mark.slow  # about 10 s on 2 idle cores
def test_points_run_on_both_nodes_and_a_held_run_folder_is_waited_for(cluster, pool_table, tmp_path):
    """The process pool's table; both nodes take points; a point whose run folder another process holds starts
    only after that process has let go. The driver is this process, attached with ``address``."""
    import ray

    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_locking import _hold
    from tests.test_sweep_runner import _cfg

    _ensure_worker(cluster)
    held = _cfg().points()[2].id
    holder = _hold(tmp_path / "ray" / "runs" / held)
    released = {}

    def release() -> None:
        time.sleep(3.0)
        released["t"] = time.time()
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    t = threading.Thread(target=release)
    t.start()
    try:
        res = run_sweep(_cfg(), tmp_path / "ray", executor="ray", address=cluster.address,
                        point_fn=_point(tmp_path / "log", delay=1.0), progress=False)
    finally:
        t.join()
    assert not ray.is_initialized()  # disconnected again; the cluster itself stays up
    assert res.ok and sorted(res.finished) == sorted(p.id for p in _cfg().points())
    att = _attempts(tmp_path / "log")
    assert len(att) == 3 and all("end" in a for a in att)
    assert {a["node"] for a in att} == {cluster.head_node.node_id, cluster.worker.node_id}
    (h,) = [a for a in att if a["point"] == held]
    assert h["start"] >= released["t"]  # waited for the holder instead of running beside it
    pd.testing.assert_frame_equal(res.table, pool_table)


@needs_ray
@pytest.mark.slow
def test_killing_the_worker_node_mid_point_loses_nothing_and_never_runs_a_point_twice_at_once(cluster, pool_table,
                                                                                              tmp_path):
    from tests.test_sweep_runner import _cfg

    _ensure_worker(cluster)
    worker = cluster.worker
    log = tmp_path / "log"
    proc = _driver(tmp_path / "ray", cluster.address, log, delay=3.0)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        victim = next((a for a in _attempts(log) if a["node"] == worker.node_id), None) if log.is_dir() else None
        time.sleep(0.1)
    assert victim is not None, "no point started on the worker node"
    killed_at = time.time()
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL the node's raylet and its processes
    res = _finish(proc)
    # Ray resubmitted the lost point to the head: every point finished in this one run, none failed.
    assert sorted(res["finished"]) == sorted(p.id for p in _cfg().points()) and not res["failed"], res
    att = _attempts(log)
    lost = [a for a in att if a["pid"] == victim["pid"]]
    assert len(lost) == 1 and "end" not in lost[0]  # that attempt was cut off mid-point
    retry = [a for a in att if a["point"] == victim["point"] and a["pid"] != victim["pid"]]
    assert len(retry) == 1 and retry[0]["node"] == cluster.head_node.node_id and retry[0]["start"] > killed_at
    assert all(not a["live_earlier"] for a in att), att  # no attempt ever started beside a live one
    pd.testing.assert_frame_equal(_table(tmp_path / "ray"), pool_table)  # the finished sweep is the pool's


def test_ray_missing_is_clear_error(monkeypatch, tmp_path):
    import builtins

    from dpquant_sim.errors import ConfigError
    from dpquant_sim.sweep.executors import run_ray

    real_import = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"dpquant-sim\[ray\]"):
        list(run_ray([("x", None, tmp_path)], print))
