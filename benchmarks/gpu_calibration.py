"""GPU calibration: measured GEMM throughput per precision, memory bandwidth, and emulator-vs-hardware FP8.

Needs a CUDA GPU for real figures (tests run it on the CPU with --device cpu --quick). From the repository root:

    PYTHONPATH=. python benchmarks/gpu_calibration.py --out calib/ --profile h200   # the whole prepared run
    PYTHONPATH=. python benchmarks/gpu_calibration.py --out calib/ --dry-run        # list the shapes, no GPU

What it measures, in one run on one device:
  1. GEMM throughput (TFLOP/s) for fp32, tf32, bf16, fp16, fp8 (torch._scaled_mm, e4m3 x e4m3 -> bf16/fp32)
     and int8 (torch._int_mm) on square and training-shaped (implicit-GEMM conv, DP per-sample) problems,
     as the ratio to the device's datasheet peak -> the achievable "gemm_efficiency" of a hardware profile.
  2. Device-to-device copy bandwidth -> the achievable "bandwidth_efficiency".
  3. Emulator vs hardware: dpquant_sim.numerics.quantize(x, "fp8_e4m3"/"fp8_e5m2") against torch's native
     float8 casts on the GPU (bit for bit), and an emulated FP8 GEMM (quantized operands, fp32 matmul) against
     the real FP8 tensor-core GEMM (torch._scaled_mm with fp32 output): relative error of the results.
  4. Emulator throughput on the GPU against the native cast and a plain copy.
  5. Every distinct GEMM of the shipped resnet18 and resnet50 (CIFAR inputs, 3x32x32) at batch 64 and 256:
     forward, input gradient (dgrad), weight gradient (wgrad) and the DP per-sample weight gradient (a batched
     GEMM of B independent products, what Opacus hooks run), with the dimensions the cost model uses
     (dpquant_sim.cost.flops), timed both as one synchronous call (``seconds``, includes host dispatch) and as
     calls queued back to back (``seconds_queued``, what a training step sees).
  6. The CURRENT cost model's error on the new measurements, before any refit (model_error.csv and the
     summary in checks.json), against the profile given with --profile.
Outputs in --out: gemm.csv (legacy square/conv/linear shapes), gemm_models.csv (model shapes), checks.json,
model_error.csv. Then refit and cross-validate: python -m dpquant_sim.cost.calibrate OUT/gemm.csv ...
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_cpu(fn, *, warmup_s: float = 0.2, iters: int = 20, queued: int = 1) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(queued):
            fn()
        times.append((time.perf_counter() - t) / queued)
    return statistics.median(times)


def _time_cuda(fn, *, warmup_s: float = 0.2, iters: int = 20, queued: int = 1) -> float:
    """Median seconds per call, timed with CUDA events after ``warmup_s`` seconds of warm-up calls; with
    ``queued`` > 1, that many calls issued back to back between two events (the host's dispatch overlaps the
    previous kernel, as in a training step)."""
    if DEVICE != "cuda":
        return _time_cpu(fn, warmup_s=warmup_s, iters=iters, queued=queued)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(queued):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / queued)
    return statistics.median(times)


def _gemm_fn(prec: str, m: int, k: int, n: int, batch: int = 1):
    dev = DEVICE
    if batch > 1:  # DP per-sample weight gradients: B independent GEMMs (torch.bmm); no batched fp8/int8 API
        if prec not in ("fp32", "tf32", "bf16", "fp16"):
            raise NotImplementedError(f"no batched {prec} GEMM in torch")
        dt = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        if dev == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        a, b = torch.randn(batch, m, k, device=dev, dtype=dt), torch.randn(batch, k, n, device=dev, dtype=dt)
        return lambda: torch.bmm(a, b)
    if prec in ("fp32", "tf32"):
        a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        if dev == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        elif prec == "tf32":
            raise NotImplementedError("tf32 needs a CUDA device")
        return lambda: a @ b
    if prec in ("bf16", "fp16"):
        dt = torch.bfloat16 if prec == "bf16" else torch.float16
        a, b = torch.randn(m, k, device=dev, dtype=dt), torch.randn(k, n, device=dev, dtype=dt)
        return lambda: a @ b
    if prec == "fp8":
        a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t()  # column-major as _scaled_mm needs
        one = torch.ones((), device=dev)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    if prec == "int8":
        a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8).t()
        return lambda: torch._int_mm(a, b)
    raise ValueError(prec)


# Datasheet dense peaks (TFLOP/s or TOP/s) of the H100 SXM and H200 (same compute), from hw_profiles.
DATASHEET_PEAK = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9}

SHAPES = [
    ("square-2048", 2048, 2048, 2048),
    ("square-4096", 4096, 4096, 4096),
    ("square-8192", 8192, 8192, 8192),
    # ResNet18-on-32x32 layer1 conv as implicit GEMM at batch 256: M=256*32*32, K=64*9, N=64
    ("conv-l1-b256", 256 * 32 * 32, 576, 64),
    # ResNet18 layer4 conv: M=256*4*4, K=512*9, N=512
    ("conv-l4-b256", 256 * 4 * 4, 4608, 512),
    # an MLP layer at batch 256
    ("linear-b256", 256, 4096, 4096),
]


PRECS = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")
API = {"fp32": "matmul", "tf32": "matmul", "bf16": "matmul", "fp16": "matmul", "fp8": "scaled_mm", "int8": "int_mm"}


def model_shapes(models=("resnet18", "resnet50"), batches=(64, 256), input_shape=(3, 32, 32)) -> list[dict]:
    """Every distinct GEMM (M, K, N, batch) of the models' steps, labelled by where it first occurs, with the
    dimensions the cost model uses (forward, dgrad, wgrad; DP per-sample wgrad as a batched GEMM)."""
    from dpquant_sim.cost.flops import step_ops
    from dpquant_sim.cost.run import build_shapes

    seen: dict[tuple, dict] = {}
    for model in models:
        shapes = build_shapes(model, input_shape, 10)
        for batch in batches:
            for dp, tag in ((False, ""), (True, "-psg")):
                for o in step_ops(shapes, None, batch=batch, dp=dp):
                    if o.kind != "gemm" or (dp and o.op != "wgrad"):
                        continue
                    m, k, n, b = (int(v) for v in o.dims)
                    key = (m, k, n, b)
                    if key not in seen:
                        seen[key] = {"shape": f"{model}-b{batch}-{o.layer}-{o.op}{tag}", "m": m, "k": k, "n": n,
                                     "batch": b, "uses": 0}
                    seen[key]["uses"] += 1
    return list(seen.values())


def _measure(rows: list[dict], shapes: list[dict], precs=PRECS, *, quick: bool = False, queued: bool = False,
             warmup_s: float = 0.2, iters: int = 20) -> None:
    warm, iters = (0.0, 2) if quick else (warmup_s, iters)
    for prec in precs:
        for sh in shapes:
            m, k, n, b = sh["m"], sh["k"], sh["n"], sh.get("batch", 1)
            row = {"precision": prec, "api": "bmm" if b > 1 else API[prec], **sh}
            try:
                fn = _gemm_fn(prec, m, k, n, b)
                t = _time_cuda(fn, warmup_s=warm, iters=iters)
                if queued:
                    row["seconds_queued"] = _time_cuda(fn, warmup_s=warm, iters=max(2, iters // 4), queued=10)
            except Exception as e:  # a precision the device/torch build lacks
                rows.append({**row, "error": repr(e)[:200]})
                continue
            tflops = 2 * m * k * n * b / t / 1e12
            rows.append({**row, "seconds": t, "tflops": tflops, "frac_of_datasheet": tflops / DATASHEET_PEAK[prec]})
            frac = tflops / DATASHEET_PEAK[prec]
            print(f"{prec:5s} {sh['shape'][:44]:44s} {tflops:9.1f} TFLOP/s  ({frac:.2f} of peak)")
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False


def measure_gemms(rows: list[dict], *, quick: bool = False) -> None:
    _measure(rows, [{"shape": label, "m": m, "k": k, "n": n} for label, m, k, n in SHAPES], quick=quick)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def model_error(csv_path: Path, profile_name: str, out: Path) -> dict:
    """The current cost model's error on measured GEMMs (no refit): per row predicted (kernel model + the
    profile's fitted harness call floor) / measured - 1, written to ``out``; summary returned."""
    import pandas as pd

    from dpquant_sim.cost.calibrate import Device, Params, _rows, predict
    from dpquant_sim.cost.profiles import get_profile

    prof = get_profile(profile_name)
    df = pd.read_csv(csv_path)
    if "seconds" not in df.columns:
        return {"profile": profile_name, "points": 0}
    df = df[df.get("batch", 1).fillna(1) == 1] if "batch" in df.columns else df  # batched (bmm) rows: see below
    rows = _rows(df)
    bw = prof.bandwidth * prof.efficiency.bandwidth.value
    dev = Device.from_profile(prof, bw)
    floors = prof.kernel.measured.call_floor_us if (prof.kernel and prof.kernel.measured) else {}
    k_fill, overlap = prof.kernel_constants
    prm = Params({p: prof.gemm_efficiency(p) for p in rows["precision"].unique()}, k_fill, overlap, 0.0,
                 {a: floors.get(a, 0.0) * 1e-6 for a in ("matmul", "scaled_mm", "int_mm")})
    pred = predict(rows, dev, prm)
    rows = rows.assign(predicted_s=pred, error=pred / rows["seconds"] - 1.0)
    rows.to_csv(out, index=False)
    err = rows["error"].abs()
    return {"profile": profile_name, "points": int(len(rows)), "mean_abs_error": float(err.mean()),
            "max_abs_error": float(err.max()), "band": [float(rows["error"].min()), float(rows["error"].max())],
            "note": "current model, before any refit; single-call times with the profile's fitted call floor"}


def measure_bandwidth() -> float:
    x = torch.empty(2**28, device=DEVICE)  # 1 GiB
    y = torch.empty_like(x)
    t = _time_cuda(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / t / 1e12
    print(f"copy bandwidth: {bw:.2f} TB/s (read + write)")
    return bw


def emulator_checks() -> dict:
    from dpquant_sim.numerics import quantize

    out: dict = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    # every float32 bit pattern near the e4m3/e5m2 ranges, plus random data, on the GPU
    x = torch.randn(1 << 22, generator=g) * torch.exp2(torch.randint(-20, 18, (1 << 22,), generator=g).float())
    x = x.cuda()
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        ours = quantize(x, name, overflow="saturate")
        ref = x.clamp(-torch.finfo(dt).max, torch.finfo(dt).max).to(dt).float()
        mism = (ours.view(torch.int32) != ref.view(torch.int32)).sum().item()
        out[f"{name}_cast_mismatches"] = int(mism)
        out[f"{name}_cast_checked"] = int(x.numel())
        print(f"emulator vs native cast on GPU, {name}: {mism} mismatches of {x.numel()}")

    # emulated FP8 GEMM vs the real FP8 tensor-core GEMM (same quantized operands, fp32 output)
    res = []
    for m, k, n in ((512, 512, 512), (2048, 4096, 1024), (256 * 64, 576, 64)):
        a = torch.randn(m, k, device="cuda")
        b = torch.randn(n, k, device="cuda")
        sa = a.abs().amax() / 448.0
        sb = b.abs().amax() / 448.0
        qa = quantize(a / sa, "fp8_e4m3")
        qb = quantize(b / sb, "fp8_e4m3")
        emu = (qa.double() @ qb.double().t()) * (sa.double() * sb.double())
        real = torch._scaled_mm(
            (a / sa).to(torch.float8_e4m3fn),
            (b / sb).to(torch.float8_e4m3fn).t(),
            scale_a=sa.float(),
            scale_b=sb.float(),
            out_dtype=torch.float32,
        )
        rel = ((real.double() - emu).norm() / emu.norm()).item()
        # the same quantized operands through an fp32 (tf32 off) GEMM: the accumulation-error floor of fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        f32 = (qa @ qb.t()) * (sa * sb)
        rel_f32 = ((f32.double() - emu).norm() / emu.norm()).item()
        maxrel = ((real.double() - emu).abs().max() / emu.abs().max()).item()
        res.append(
            {"m": m, "k": k, "n": n, "rel_fro_error": rel, "max_abs_err_over_max": maxrel, "fp32_gemm_rel": rel_f32}
        )
        print(f"emulated vs hardware fp8 GEMM {m}x{k}x{n}: rel. Frobenius error {rel:.2e} (fp32 GEMM: {rel_f32:.2e})")
    out["fp8_gemm_vs_emulator"] = res

    # emulator throughput on the GPU
    x = torch.randn(1 << 24, device="cuda")
    t_copy = _time_cuda(lambda: x.clone())
    t_native = _time_cuda(lambda: x.to(torch.float8_e4m3fn).float())
    t_ours = _time_cuda(lambda: quantize(x, "fp8_e4m3"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    t_sr = _time_cuda(lambda: quantize(x, "fp8_e4m3", rounding="stochastic", generator=gen))
    out["gpu_throughput_elems_per_s"] = {
        "copy": x.numel() / t_copy,
        "native_e4m3_cast": x.numel() / t_native,
        "ours_nearest_e4m3": x.numel() / t_ours,
        "ours_stochastic_e4m3": x.numel() / t_sr,
    }
    print(json.dumps(out["gpu_throughput_elems_per_s"], indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("calib"))
    ap.add_argument("--profile", default="h200", help="profile whose current model is scored on the new data")
    ap.add_argument("--dry-run", action="store_true", help="write the shape plan (shapes.csv) and exit; no GPU")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: exercise the whole script without a GPU (figures meaningless)")
    ap.add_argument("--quick", action="store_true", help="tiny warm-up and iteration counts (tests)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N model shapes (tests)")
    ap.add_argument("--skip-legacy", action="store_true", help="skip the 6 legacy shapes and the emulator checks")
    ap.add_argument("--precisions", default=",".join(PRECS), help="comma-separated subset of " + ",".join(PRECS))
    args = ap.parse_args(argv)
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = model_shapes()
    if args.limit is not None:
        shapes = shapes[: args.limit]
    _write_csv(args.out / "shapes.csv", shapes)
    print(f"{len(shapes)} distinct model GEMMs (resnet18, resnet50; batch 64, 256; fwd, dgrad, wgrad, per-sample "
          f"wgrad) x {len(PRECS)} precisions -> {args.out / 'shapes.csv'}")
    if args.dry_run:
        return 0
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this calibration needs a GPU (use --dry-run to list the shapes, or --device cpu "
              "to exercise the script)", file=sys.stderr)
        return 2
    info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "model_shapes": len(shapes)}
    print(info)
    if DEVICE == "cuda":  # idle GPUs sit at low clocks: spin a large bf16 GEMM before measuring anything
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        _time_cuda(lambda: a @ a, warmup_s=5.0, iters=5)
        try:
            import subprocess

            info["clocks_event_reasons"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=clocks_event_reasons.active", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e:  # report only
            info["clocks_event_reasons"] = repr(e)
    if not args.skip_legacy:
        rows: list[dict] = []
        measure_gemms(rows, quick=args.quick)
        _write_csv(args.out / "gemm.csv", rows)
    mrows: list[dict] = []
    # ~1,100 measurements: shorter warm-up and fewer repeats than the legacy shapes keep this part near 3 minutes
    precs = tuple(p for p in args.precisions.split(",") if p in PRECS)
    _measure(mrows, shapes, precs, quick=args.quick, queued=True, warmup_s=0.05, iters=10)
    _write_csv(args.out / "gemm_models.csv", mrows)
    if DEVICE == "cuda":
        info["copy_bandwidth_TBps"] = measure_bandwidth()
        if not args.skip_legacy:
            try:
                info.update(emulator_checks())
            except Exception as e:  # report, keep the GEMM figures
                info["emulator_checks_error"] = repr(e)
                print("emulator checks failed:", repr(e))
    try:  # the current model's error on the new shapes, BEFORE any refit
        info["model_error_before_refit"] = model_error(args.out / "gemm_models.csv", args.profile,
                                                       args.out / "model_error.csv")
        print("current model on the model shapes:", json.dumps(info["model_error_before_refit"]))
    except Exception as e:  # report, keep the measurements
        info["model_error_failed"] = repr(e)
        print("model error failed:", repr(e))
    (args.out / "checks.json").write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
