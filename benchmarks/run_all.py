"""Run every benchmark in benchmarks/ and keep what each printed and wrote (``make bench``).

    .venv/bin/python benchmarks/run_all.py [--out runs/bench] [--full] [--only bench_cost bench_quantize ...]

Quick mode (default, a few minutes on 2 cores): each CPU benchmark on a small workload, enough to see that it
runs and to read its same-run ratios, not the figures of docs/benchmarks.md (those come from ``--full``, each
script's own defaults, tens of minutes). The GPU scripts (gpu_calibration, gpu_dp_steps) run only where CUDA is
available (``--quick`` unless ``--full``); on a CPU they are skipped (tests run their CPU path).

Writes ``OUT/<name>.log`` (the script's stdout and stderr), the files the script writes itself
(``OUT/bench_quantize.csv``, ``OUT/bench_dp_step.json``, ``OUT/gpu_*/``) and ``OUT/summary.json`` (per script:
command, exit code, seconds). Exits 1 when a script failed, after running the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Bench:
    name: str
    quick: list[str]  # extra arguments in quick mode
    full: list[str] = field(default_factory=list)  # extra arguments with --full ([]: the script's defaults)
    output: list[str] = field(default_factory=list)  # arguments naming its output; {out} is the output folder
    gpu: bool = False  # needs CUDA for meaningful figures: skipped without it


BENCHES = [
    Bench("bench_cost", quick=["--plans", "20", "--scalar-points", "20"],
          full=["--plans", "200", "--scalar-points", "100"]),
    Bench("bench_quantize", quick=["--numel", str(1 << 20), "--repeats", "3", "--formats", "fp8_e4m3",
                                   "--no-qtorch"], output=["--csv", "{out}/bench_quantize.csv"]),
    Bench("bench_dp_step", quick=["--models", "cnn", "--batch", "64", "--steps", "2", "--repeats", "3"],
          full=["--models", "cnn", "resnet18-w16", "--batch", "256", "--memory"],
          output=["--json", "{out}/bench_dp_step.json"]),
    Bench("bench_estimators", quick=["--model", "cnn", "--recipe", "fp8", "--n", "400", "--repeats", "1"],
          full=["--model", "resnet18-w16", "--recipe", "luq_fp4"]),
    Bench("gpu_calibration", quick=["--quick"], output=["--out", "{out}/gpu_calibration"], gpu=True),
    Bench("gpu_dp_steps", quick=["--quick"], output=["--out", "{out}/gpu_dp_steps"], gpu=True),
]


def command(b: Bench, out: Path, full: bool) -> list[str]:
    """The command line that runs benchmark ``b`` writing under ``out``."""
    args = (b.full if full else b.quick) + [a.format(out=out) for a in b.output]
    return [sys.executable, str(HERE / f"{b.name}.py"), *args]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (created)")
    ap.add_argument("--full", action="store_true", help="each script's full workload (tens of minutes)")
    ap.add_argument("--only", nargs="+", default=None, choices=[b.name for b in BENCHES], metavar="NAME",
                    help="run these only: " + ", ".join(b.name for b in BENCHES))
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpu = cuda_available()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    summary: dict[str, dict] = {}
    for b in BENCHES:
        if args.only and b.name not in args.only:
            continue
        if b.gpu and not gpu:
            print(f"== {b.name}: skipped (needs CUDA; see docs/gpu_calibration.md)", flush=True)
            summary[b.name] = {"skipped": "no CUDA device"}
            continue
        cmd = command(b, out, args.full)
        print(f"== {b.name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with open(out / f"{b.name}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            assert proc.stdout is not None
            for line in proc.stdout:  # shown as it runs and kept
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        secs = time.perf_counter() - t0
        summary[b.name] = {"command": cmd[1:], "returncode": rc, "seconds": round(secs, 2)}
        print(f"== {b.name}: {'ok' if rc == 0 else f'FAILED (exit code {rc})'} in {secs:.1f} s", flush=True)
    (out / "summary.json").write_text(json.dumps({"mode": "full" if args.full else "quick", "benchmarks": summary},
                                                 indent=2) + "\n")
    failed = [n for n, s in summary.items() if s.get("returncode", 0) != 0]
    print(f"wrote {out}/ (summary.json, <name>.log)" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
