"""Executors run a point function over sweep points: a local process pool (default) or Ray.

Both call ``point_fn(config, run_dir)`` for each point and yield ``(point_id, error_or_None)`` as points
finish, in completion order. A point function must be a picklable top-level callable; it must write its
results atomically and treat an existing complete run as done (``training.engine.train`` does both), so
an interrupted sweep never loses or overwrites a finished result.

No cluster code lives here: the local executor is ``concurrent.futures.ProcessPoolExecutor``; the Ray
executor is plain ``ray.remote`` tasks on whatever ``ray.init(address=...)`` connects to.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dpquant_sim.errors import ConfigError

PointFn = Callable[[Any, Path], Any]
Task = tuple[str, Any, Path]  # (point id, TrainConfig, run dir)


def _set_threads(n: int) -> None:
    """Worker initializer: one BLAS/torch thread pool of size n per worker (no oversubscription).

    torch sizes its pool from OMP_NUM_THREADS when it is first imported, so it is only imported here (seconds
    per worker) when it is already loaded; a point function that needs it imports it with the variable set."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_PERIOD_S = 0.5


def _die_with_parent(parent_pid: int) -> None:
    """Make this pool worker die when the sweep process that started it dies, however it dies (SIGKILL too).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, delivered by the kernel the moment the parent exits (strictly:
    when the parent's thread that spawned the worker exits; ``run_local`` spawns from the thread that runs the
    sweep, which outlives the pool). Everywhere, as a fallback: a daemon thread that SIGKILLs this process once
    its parent pid changes (re-parented to init or a subreaper), within ``WATCHDOG_PERIOD_S``. An orphaned
    worker would otherwise keep training queued points and race a rerun of the sweep.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog still covers it
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dpquant-parent-watchdog", daemon=True).start()


class _Terminated(SystemExit):
    """Raised in a pool worker by SIGTERM (the parent stopping a running point)."""


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM unwinds the worker like an exit, so the point's run-folder lock is released and its half-written
    temporary file removed on the way out; ``_call`` then ends the process (the pool would otherwise catch the
    exception and hand the worker its next point)."""
    raise _Terminated(128 + signum)


MAIN_GUARD_HINT = (
    "a script that calls run_sweep (or anything that starts a process pool) must do so under "
    "`if __name__ == \"__main__\":`: the pool's workers are spawned, fresh interpreters that import the script "
    "again, and without the guard each of them starts the sweep itself (docs/usage.md, section 2)")


class WorkersDidNotStart(RuntimeError):
    """The process pool's workers died while starting (before their initializer ran), so no point ran."""


def in_spawned_bootstrap() -> bool:
    """True while a spawned worker process imports the parent's main script (``multiprocessing``'s own test for
    code that would start processes recursively)."""
    import multiprocessing as mp

    return bool(getattr(mp.current_process(), "_inheriting", False))


def _worker_init(threads: int, parent_pid: int, started: Any = None) -> None:
    """Pool worker initializer: die with the parent, leave Ctrl-C to it, ``threads`` torch threads.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group, workers included; they ignore it
    so that the parent alone handles it (it cancels queued points and terminates running workers, whose SIGTERM
    unwinds them cleanly), instead of every worker printing its own KeyboardInterrupt traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with_parent(parent_pid)
    _set_threads(threads)
    if started is not None:
        started.set()  # this worker got past importing the main script


def _call(point_fn: PointFn, config: Any, run_dir: Path) -> str | None:
    """Run one point; return None on success or the formatted traceback (never raises, so one failure
    cannot take the pool down)."""
    try:
        point_fn(config, Path(run_dir))
        return None
    except _Terminated as e:
        os._exit(int(e.code))  # unwound; now leave for real (see _exit_on_sigterm)
    except Exception:  # noqa: BLE001 - reported per point by the runner
        return traceback.format_exc()


def run_serial(tasks: Sequence[Task], point_fn: PointFn, *, threads: int = 1) -> Iterator[tuple[str, str | None]]:
    """Run points one after another in this process (workers=1; easiest to debug)."""
    _set_threads(threads)
    for pid, cfg, run_dir in tasks:
        yield pid, _call(point_fn, cfg, run_dir)


def run_local(
    tasks: Sequence[Task], point_fn: PointFn, *, workers: int, threads: int = 1
) -> Iterator[tuple[str, str | None]]:
    """Run points in a ``ProcessPoolExecutor`` of ``workers`` spawned processes, ``threads`` torch threads each.

    On KeyboardInterrupt pending points are cancelled and running workers are terminated; finished runs
    stay on disk (their writes were atomic) and a rerun picks up from there. If this process is killed
    outright (SIGKILL), its workers die with it (``_die_with_parent``) instead of training on as orphans.
    """
    import multiprocessing as mp

    if workers <= 1:
        yield from run_serial(tasks, point_fn, threads=threads)
        return
    # spawn: a fresh interpreter per worker (fork after torch/OpenMP initialised can deadlock).
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(threads, os.getpid(), started))
    futures = {}
    try:
        for pid, cfg, run_dir in tasks:
            futures[pool.submit(_call, point_fn, cfg, run_dir)] = pid
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    err = f.result()
                except BrokenProcessPool:
                    if not started.is_set():  # no worker ever ran its initializer: they died importing __main__
                        raise WorkersDidNotStart(
                            "the sweep's worker processes died while starting, before running any point (their "
                            f"errors are printed above); the usual cause: {MAIN_GUARD_HINT}") from None
                    err = traceback.format_exc()  # a worker crashed (e.g. killed, out of memory)
                except Exception:  # worker crashed (e.g. killed, out of memory)
                    err = traceback.format_exc()
                yield futures[f], err
    except BaseException:
        for f in futures:
            f.cancel()
        # Terminate running workers now instead of waiting for their points to finish.
        procs = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:  # let them unwind (locks, temporaries) before this process exits and kills them
            p.join(timeout=10)
        raise
    else:
        pool.shutdown(wait=True)


RAY_MAX_RETRIES = 3  # resubmissions of a point whose Ray worker process or node died (system failures only)
RAY_LOCK_WAIT_S = 120.0  # how long a Ray task waits for its run folder's lock before running the point anyway


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_ray(
    tasks: Sequence[Task],
    point_fn: PointFn,
    *,
    workers: int | None = None,
    threads: int = 1,
    address: str | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Run points as Ray tasks (``num_cpus=threads`` each).

    ``address``: an existing cluster ('auto', 'HEAD_IP:6379' or 'ray://head:10001'); None starts a new local
    Ray instance with ``workers`` CPUs (default: all) and shuts it down afterwards. Run directories must be on
    storage every node sees (a shared filesystem) for results to land in one sweep folder.

    Worker loss: a task whose worker process or node dies is resubmitted by Ray (``RAY_MAX_RETRIES`` times;
    errors raised by the point function itself are reported, not retried). Before calling the point function a
    task waits up to ``RAY_LOCK_WAIT_S`` for the run folder's lock (``dpquant_sim.locking``) to be free, so a
    retry never trains beside a dying attempt that still holds the folder; the point function takes the lock
    itself (``training.engine.train`` does), so one run folder never has two writers.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "executor", "ray", 'an installed Ray: pip install "dpquant-sim[ray]" (or use --executor local)'
        ) from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kw)
        else:  # "local": a new instance, never a cluster that happens to run on this machine
            ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, **kw)
        started = True
    try:

        def _remote(fn, cfg, run_dir, n_threads, lock_wait_s):
            from dpquant_sim.locking import wait_until_free

            _set_threads(n_threads)
            wait_until_free(Path(run_dir), lock_wait_s)  # an earlier attempt may still be dying; see above
            return _call(fn, cfg, Path(run_dir))

        remote = ray.remote(num_cpus=threads, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(_remote)
        fn_ref = ray.put(point_fn)
        # Absolute paths: a task's working directory is not the driver's (on another node it may not exist).
        refs = {remote.remote(fn_ref, cfg, str(Path(run_dir).absolute()), threads, RAY_LOCK_WAIT_S): pid
                for pid, cfg, run_dir in tasks}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    try:
                        err = ray.get(r)
                    except Exception:  # task or worker died
                        err = traceback.format_exc()
                    yield refs[r], err
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
