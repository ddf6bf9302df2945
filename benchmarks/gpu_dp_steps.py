"""DP training steps on a GPU under every clipping algorithm, against the cost model's prediction, plus the
quantizer's GPU throughput (issue: "the engine has never trained on CUDA").

For each model (cnn 1x8x8, resnet18 3x32x32; batch 256), each clipping algorithm (hooks, ghost, bk, mixed) and
each recipe (fp32 = no quantized layer, then every quantizable layer in ``--recipes``): ms per DP step (CUDA
events around ``--steps`` queued steps, median of ``--repeats``), peak GPU memory of one step
(``torch.cuda.max_memory_allocated`` above the memory before the step), and the cost model's roofline time for
the same step on ``--profile`` (same shapes, plan, batch, clipping algorithm; full-precision layers at fp32, as
the engine runs them), with the model's error. Also the emulator on the GPU: elements/s of
``quantize(x, fmt)`` for the eager, compiled and auto backends against a plain copy, nearest and stochastic.

One prepared run, from the repository root (writes dp_steps.csv, quantizer.csv and env.json under --out; each
section has its own time limit and what finished is written as it goes):

    PYTHONPATH=. python benchmarks/gpu_dp_steps.py --out $OUT/dp --profile h200
    PYTHONPATH=. python benchmarks/gpu_dp_steps.py --out /tmp/dp --device cpu --quick   # whole script, on CPU
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dp_step as B  # noqa: E402

MODELS = {"cnn": (1, 8, 10), "resnet18": (3, 32, 10)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step, device: str, steps: int, repeats: int) -> float:
    """Median seconds per step over ``repeats`` rounds of ``steps`` queued steps (after one warm-up step)."""
    step()
    _sync(device)
    out = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                step()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / steps)
        else:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            out.append((time.perf_counter() - t) / steps)
    return statistics.median(out)


def peak_step_mib(step, device: str) -> float:
    return B.cuda_peak_mib(step) if device == "cuda" else float("nan")


def predicted_s(model: str, recipe: str, clipping: str, batch: int, profile) -> tuple[float, float]:
    """(roofline, theoretical) seconds of the cost model for the same DP step."""
    from dpquant_sim.cost.model import step_cost
    from dpquant_sim.cost.run import build_shapes

    c, s, k = MODELS[model]
    shapes = build_shapes(model, (c, s, s), k)
    plan = {} if recipe == "fp32" else {sh.name: recipe for sh in shapes if sh.gemm_mnk is not None}
    sc = step_cost(shapes, plan, profile, batch=batch, base="fp32", dp=True, clipping=clipping)
    return sc.roofline_s, sc.theoretical_s


def dp_steps(args, writer, deadline: float) -> None:
    from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS
    from dpquant_sim.cost.profiles import get_profile

    profile = get_profile(args.profile)
    for model in args.models:
        B.INPUTS.setdefault(model, MODELS[model])
        variants = ["np_fp32"] + [f"{a}_{r}" for a in CLIPPING_ALGORITHMS for r in ["fp32", *args.recipes]]
        for v in variants:
            if time.time() > deadline:
                print(f"dp steps: time limit reached before {model} {v}", flush=True)
                return
            row = {"model": model, "variant": v, "batch": args.batch, "device": args.device}
            try:
                step = B.make_step(v, model, args.batch, args.device)
                row["ms_per_step"] = 1e3 * time_step(step, args.device, args.steps, args.repeats)
                row["peak_step_mib"] = peak_step_mib(step, args.device)
                if v != "np_fp32":
                    alg, recipe = v.split("_", 1)
                    roof, theo = predicted_s(model, recipe, alg, args.batch, profile)
                    row.update(profile=profile.name, predicted_roofline_ms=1e3 * roof,
                               predicted_theoretical_ms=1e3 * theo,
                               roofline_error_pct=100 * (1e3 * roof - row["ms_per_step"]) / row["ms_per_step"])
                del step
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if args.device == "cuda":
                torch.cuda.empty_cache()
            writer(row)
            print(row, flush=True)


def quantizer(args, writer, deadline: float) -> None:
    from dpquant_sim.numerics import quantize

    n = 1 << (16 if args.quick else 26)
    x = torch.randn(n, device=args.device) * 10
    t_copy = time_step(lambda: x.clone(), args.device, 5, args.repeats)
    formats = ("fp8_e4m3",) if args.quick else ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8")
    backends = ("torch",) if args.quick else ("torch", "compiled", "auto")  # quick: no cold compile on a CPU
    for fmt in formats:
        for rounding in ("nearest", "stochastic"):
            gen = torch.Generator(device=args.device).manual_seed(0)
            for backend in backends:
                if time.time() > deadline:
                    return
                fn = lambda: quantize(x, fmt, rounding=rounding, generator=gen, backend=backend)  # noqa: E731
                t = time_step(fn, args.device, 5, args.repeats)
                row = {"format": fmt, "rounding": rounding, "backend": backend, "numel": n, "ms": 1e3 * t,
                       "gelem_per_s": n / t / 1e9, "copy_ms": 1e3 * t_copy, "x_copy": t_copy / t}
                writer(row)
                print(row, flush=True)


def _csv_writer(path: Path):
    rows: list[dict] = []

    def write(row: dict) -> None:
        rows.append(row)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(path)
    return write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="h200", help="hardware profile the cost model predicts on")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--recipes", nargs="*", default=None, help="default: fp8, and luq_fp4 where registered")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-s", type=float, default=420.0, help="time limit of the whole run (seconds)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and counts (CPU test of the script)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --quick to exercise the script")
    from dpquant_sim.nn.config import RECIPES

    if a.recipes is None:
        a.recipes = [r for r in ("fp8", "luq_fp4") if r in RECIPES]
    if a.quick:
        a.batch, a.steps, a.repeats, a.models = 4, 1, 1, ["cnn"]
    a.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": a.device,
           "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None, "profile": a.profile,
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    (a.out / "env.json").write_text(json.dumps(env, indent=2))
    deadline = time.time() + a.limit_s
    quantizer(a, _csv_writer(a.out / "quantizer.csv"), time.time() + min(90.0, a.limit_s / 4))
    dp_steps(a, _csv_writer(a.out / "dp_steps.csv"), deadline)


if __name__ == "__main__":
    main()
