"""Time and peak memory of one DP step under each clipping algorithm, as multiples of the same model's
non-private step, measured in one run.

Variants (one fixed batch of ``--batch`` examples, default 256):

  np_fp32             non-private step of our converted model (Q layers in full precision), plain SGD
  <alg>_fp32          DP step with clipping algorithm <alg> (hooks, ghost, bk, mixed), full precision
  <alg>_<recipe>      the same with every quantizable layer quantized by ``--recipes`` (emulated)
  opacus_np           non-private step of the unconverted model (plain nn.Linear/Conv2d)
  opacus_hooks        Opacus hooks mode (GradSampleModule + DPOptimizer) on the unconverted model
  opacus_ghost        Opacus ghost clipping (GradSampleModuleFastGradientClipping + DPLossFastGradientClipping)
                      on the unconverted model

Time: median over ``--repeats`` rounds of ``--steps`` steps, variants timed round-robin so that machine load
hits all alike. Memory (``--memory``): each variant in a fresh subprocess; after one warm-up step, Linux's
peak-RSS counter is reset (/proc/self/clear_refs) and the peak growth over the RSS before the second step is
the step's working memory (activations, per-sample gradients, buffers; model and optimizer state excluded);
glibc is told to return large freed blocks to the OS at once (MALLOC_MMAP_THRESHOLD_), so RSS tracks live
memory.

    .venv/bin/python benchmarks/bench_dp_step.py --models cnn resnet18-w16 --batch 256 --memory
    .venv/bin/python benchmarks/bench_dp_step.py --models resnet18 --algorithms mixed --recipes --memory-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

INPUTS = {"cnn": (1, 8, 10), "mlp": (1, 8, 10), "resnet18-w16": (1, 8, 10), "resnet18": (3, 32, 10),
          "resnet50": (3, 32, 10), "densenet121": (3, 32, 10)}


def _batch(name: str, batch: int, device: str):
    c, s, k = INPUTS[name]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, c, s, s, generator=g).to(device), torch.randint(0, k, (batch,), generator=g).to(device)


def _fresh(name: str, device: str, convert: bool):
    import dpquant_sim.nn as qnn
    from dpquant_sim.training.models import build_model

    c, s, k = INPUTS[name]
    torch.manual_seed(0)
    m = build_model(name, in_channels=c, num_classes=k, image_size=s)
    if convert:
        m = qnn.convert_model(m, seed=0)
    m = m.to(device)
    if convert and device != "cpu":
        qnn.set_generators(m, 0)
    return m


def make_step(variant: str, name: str, batch: int, device: str):
    """A zero-argument callable running one step of ``variant`` on a fixed batch."""
    import dpquant_sim.nn as qnn
    from dpquant_sim.training.clipping import build_clipping

    x, y = _batch(name, batch, device)
    gen = torch.Generator(device=device).manual_seed(0)
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch, generator=gen)
    if variant in ("np_fp32", "opacus_np"):
        m = _fresh(name, device, convert=variant == "np_fp32")
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step():
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if variant == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        m = _fresh(name, device, convert=False)
        gsm = GradSampleModule(m, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=1e-3), loss_reduction="sum", **dp)

        def step():
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if variant == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        m = _fresh(name, device, convert=False)
        gsm = GradSampleModuleFastGradientClipping(m, max_grad_norm=1.0, use_ghost_clipping=True,
                                                   loss_reduction="sum")
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(m.parameters(), lr=1e-3), loss_reduction="sum", **dp)
        crit = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="sum"), loss_reduction="sum")

        def step():
            crit(gsm(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    alg, recipe = variant.split("_", 1)
    m = _fresh(name, device, convert=True)
    if recipe != "fp32":
        qnn.apply_plan(m, {n: recipe for n in qnn.quantizable_layers(m)})
    clip = build_clipping(alg, m, torch.optim.SGD(m.parameters(), lr=1e-3), **dp)
    return lambda: clip.step([(x, y)], None)


def variants_for(algorithms: list[str], recipes: list[str], opacus: bool) -> list[str]:
    out = ["np_fp32"] + [f"{a}_{r}" for a in algorithms for r in ["fp32", *recipes]]
    return out + (["opacus_np", "opacus_hooks", "opacus_ghost"] if opacus else [])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(name, batch, device, variants, steps, repeats, warmup) -> dict[str, float]:
    fns = {v: make_step(v, name, batch, device) for v in variants}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(repeats):
        for v, fn in fns.items():  # round-robin: load drifts hit every variant alike
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[v].append((time.perf_counter() - t) / steps)
    return {v: statistics.median(ts) for v, ts in times.items()}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def cuda_peak_mib(step) -> float:
    """Peak CUDA memory (MiB) that one call of ``step`` allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_one(variant: str, name: str, batch: int, device: str) -> float:
    """Peak working memory (MiB) of the second step of ``variant`` in this process."""
    step = make_step(variant, name, batch, device)
    step()
    if device.startswith("cuda"):
        return cuda_peak_mib(step)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) / 1024


def memory_variants(name, batch, device, variants, threads) -> dict[str, float]:
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-child", v, "--models", name, "--batch", str(batch),
               "--device", device] + (["--threads", str(threads)] if threads else [])
        # allocations >= 64 KiB are mmapped and returned to the OS when freed, so RSS tracks live memory
        # (glibc would otherwise keep the first step's freed buffers and the second step would reuse them)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            out[v] = float("nan")
            print(f"  memory of {v} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
            continue
        out[v] = float(r.stdout.strip().splitlines()[-1])
    return out


def ratios(med: dict[str, float], algorithms, recipes) -> dict[str, float]:
    out = {}
    for a in algorithms:
        out[f"{a}_fp32/np_fp32"] = med[f"{a}_fp32"] / med["np_fp32"]
        for r in recipes:
            out[f"{a}_{r}/{a}_fp32"] = med[f"{a}_{r}"] / med[f"{a}_fp32"]
        if "opacus_ghost" in med:
            out[f"{a}_fp32/opacus_ghost"] = med[f"{a}_fp32"] / med["opacus_ghost"]
    if "opacus_ghost" in med:
        out["opacus_ghost/opacus_np"] = med["opacus_ghost"] / med["opacus_np"]
        out["opacus_hooks/opacus_np"] = med["opacus_hooks"] / med["opacus_np"]
    return out


def main() -> None:
    from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn"], choices=sorted(INPUTS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--algorithms", nargs="+", default=list(CLIPPING_ALGORITHMS), choices=CLIPPING_ALGORITHMS)
    ap.add_argument("--recipes", nargs="*", default=["fp8"])
    ap.add_argument("--no-opacus", action="store_true", help="skip the unconverted-model Opacus variants")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="also measure peak working memory (subprocess each)")
    ap.add_argument("--memory-only", action="store_true", help="measure memory, skip timing")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        print(memory_one(a.memory_child, a.models[0], a.batch, a.device))
        return
    results = []
    for m in a.models:
        variants = variants_for(a.algorithms, a.recipes, not a.no_opacus)
        res = {"model": m, "batch": a.batch, "device": a.device, "threads": torch.get_num_threads()}
        print(f"\n{m} batch={a.batch} device={a.device} threads={torch.get_num_threads()}", flush=True)
        if not a.memory_only:
            med = time_variants(m, a.batch, a.device, variants, a.steps, a.repeats, a.warmup)
            res["median_step_s"], res["time_ratios"] = med, ratios(med, a.algorithms, a.recipes)
            for v, t in med.items():
                print(f"  {v:16s} {t * 1e3:10.1f} ms/step   {t / med['np_fp32']:5.2f}x np_fp32")
            for k, v in res["time_ratios"].items():
                print(f"  {k:28s} {v:6.2f}x")
        if a.memory or a.memory_only:
            mem = memory_variants(m, a.batch, a.device, variants, a.threads)
            res["peak_step_mib"] = mem
            for v, mib in mem.items():
                print(f"  {v:16s} {mib:10.1f} MiB peak   {mib / mem['np_fp32']:5.2f}x np_fp32")
        results.append(res)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
