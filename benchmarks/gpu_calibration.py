"""GPU calibration: measured GEMM throughput per precision, memory bandwidth, and emulator-vs-hardware FP8.

Needs a CUDA GPU (never run by tests or CI). Usage, from the repository root:

    PYTHONPATH=. python benchmarks/gpu_calibration.py --out calib/   # writes gemm.csv, checks.json

What it measures, in one run on one device:
  1. GEMM throughput (TFLOP/s) for fp32, tf32, bf16, fp16, fp8 (torch._scaled_mm, e4m3 x e4m3 -> bf16/fp32)
     and int8 (torch._int_mm) on square and training-shaped (implicit-GEMM conv, DP per-sample) problems,
     as the ratio to the device's datasheet peak -> the achievable "gemm_efficiency" of a hardware profile.
  2. Device-to-device copy bandwidth -> the achievable "bandwidth_efficiency".
  3. Emulator vs hardware: dpquant_sim.numerics.quantize(x, "fp8_e4m3"/"fp8_e5m2") against torch's native
     float8 casts on the GPU (bit for bit), and an emulated FP8 GEMM (quantized operands, fp32 matmul) against
     the real FP8 tensor-core GEMM (torch._scaled_mm with fp32 output): relative error of the results.
  4. Emulator throughput on the GPU against the native cast and a plain copy.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch


def _time_cuda(fn, *, warmup_s: float = 0.2, iters: int = 20) -> float:
    """Median seconds per call, timed with CUDA events after ``warmup_s`` seconds of warm-up calls."""
    import time

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _gemm_fn(prec: str, m: int, k: int, n: int):
    dev = "cuda"
    if prec in ("fp32", "tf32"):
        a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
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


def measure_gemms(rows: list[dict]) -> None:
    for prec in ("fp32", "tf32", "bf16", "fp16", "fp8", "int8"):
        for label, m, k, n in SHAPES:
            try:
                fn = _gemm_fn(prec, m, k, n)
                t = _time_cuda(fn)
            except Exception as e:  # a precision the device/torch build lacks
                rows.append({"precision": prec, "shape": label, "m": m, "k": k, "n": n, "error": repr(e)[:200]})
                continue
            tflops = 2 * m * k * n / t / 1e12
            rows.append(
                {
                    "precision": prec,
                    "shape": label,
                    "m": m,
                    "k": k,
                    "n": n,
                    "seconds": t,
                    "tflops": tflops,
                    "frac_of_datasheet": tflops / DATASHEET_PEAK[prec],
                }
            )
            print(f"{prec:5s} {label:14s} {tflops:9.1f} TFLOP/s  ({tflops / DATASHEET_PEAK[prec]:.2f} of peak)")
    torch.backends.cuda.matmul.allow_tf32 = False


def measure_bandwidth() -> float:
    x = torch.empty(2**28, device="cuda")  # 1 GiB
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("calib"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this calibration needs a GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(info)
    # Idle GPUs sit at low clocks: spin a large bf16 GEMM for a few seconds before measuring anything.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    _time_cuda(lambda: a @ a, warmup_s=5.0, iters=5)
    rows: list[dict] = []
    measure_gemms(rows)
    keys = sorted({k for r in rows for k in r})
    with open(args.out / "gemm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    info["copy_bandwidth_TBps"] = measure_bandwidth()
    try:
        info.update(emulator_checks())
    except Exception as e:  # report, keep the GEMM figures
        info["emulator_checks_error"] = repr(e)
        print("emulator checks failed:", repr(e))
    (args.out / "checks.json").write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
