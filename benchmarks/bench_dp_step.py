"""Per-step time of DP-SGD with every layer quantized vs fp32 DP-SGD vs non-private fp32, in one run.

For each model, one fixed batch (``--batch``, default 256) and these step variants, timed round-robin so that
machine load affects all alike (median over ``--repeats`` rounds of ``--steps`` steps each):

  np_fp32      non-private step of our converted model (Q layers in full precision), plain SGD
  dp_fp32      DP-SGD step: Opacus GradSampleModule (hooks) + our MaskedDPOptimizer, Q layers in full precision
  dp_<recipe>  the same with every quantizable layer quantized by each ``--recipes`` recipe
  opacus_np    non-private step of the unconverted model (plain nn.Linear/Conv2d)
  opacus_dp    Opacus's own make_private-equivalent hooks-mode DP step on the unconverted model (DPOptimizer)

Ratios reported: dp_<recipe> / dp_fp32 (emulation overhead; target <= 1.3), dp_fp32 / np_fp32 against
opacus_dp / opacus_np (DP overhead; target: no worse than Opacus's own hooks mode).

    .venv/bin/python benchmarks/bench_dp_step.py --models cnn --batch 256
    .venv/bin/python benchmarks/bench_dp_step.py --models cnn resnet18 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

INPUTS = {"cnn": (1, 8, 10), "mlp": (1, 8, 10), "resnet18": (3, 32, 10), "resnet50": (3, 32, 10),
          "densenet121": (3, 32, 10)}


def make_variants(name: str, batch: int, device: str, recipes: list[str]):
    import dpquant_sim.nn as qnn
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from dpquant_sim.training.models import build_model
    from dpquant_sim.training.optim import MaskedDPOptimizer

    c, s, k = INPUTS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g).to(device)
    y = torch.randint(0, k, (batch,), generator=g).to(device)

    def fresh(convert: bool):
        torch.manual_seed(0)
        m = build_model(name, in_channels=c, num_classes=k, image_size=s)
        if convert:
            m = qnn.convert_model(m, seed=0)
        m = m.to(device)
        if convert and device != "cpu":
            qnn.set_generators(m, 0)
        return m

    variants = {}

    def nonprivate(m):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step():
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def dp(m, opt_cls, plan=None):
        if plan is not None:
            qnn.apply_plan(m, {n: plan for n in qnn.quantizable_layers(m)})
        gsm = GradSampleModule(m, loss_reduction="mean")
        opt = opt_cls(torch.optim.SGD(m.parameters(), lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=batch, generator=torch.Generator(device=device).manual_seed(0))

        def step():
            F.cross_entropy(gsm(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    variants["np_fp32"] = nonprivate(fresh(True))
    variants["dp_fp32"] = dp(fresh(True), MaskedDPOptimizer)
    for r in recipes:
        variants[f"dp_{r}"] = dp(fresh(True), MaskedDPOptimizer, plan=r)
    variants["opacus_np"] = nonprivate(fresh(False))
    variants["opacus_dp"] = dp(fresh(False), DPOptimizer)
    return variants


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(name: str, batch: int, device: str, recipes: list[str], steps: int, repeats: int, warmup: int):
    variants = make_variants(name, batch, device, recipes)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, fn in variants.items():  # round-robin: load drifts hit every variant alike
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[v].append((time.perf_counter() - t) / steps)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    ratios = {f"dp_{r}/dp_fp32": med[f"dp_{r}"] / med["dp_fp32"] for r in recipes}
    ratios["dp_fp32/np_fp32"] = med["dp_fp32"] / med["np_fp32"]
    ratios["opacus_dp/opacus_np"] = med["opacus_dp"] / med["opacus_np"]
    ratios["dp_fp32/opacus_dp"] = med["dp_fp32"] / med["opacus_dp"]
    return {"model": name, "batch": batch, "device": device, "median_step_s": med, "ratios": ratios,
            "steps": steps, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn"], choices=sorted(INPUTS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batch-large", type=int, default=None, help="batch for resnet/densenet (default --batch)")
    ap.add_argument("--recipes", nargs="+", default=["fp8", "fp4"])
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for m in a.models:
        b = a.batch_large if (a.batch_large and m in ("resnet18", "resnet50", "densenet121")) else a.batch
        r = bench(m, b, a.device, a.recipes, a.steps, a.repeats, a.warmup)
        results.append(r)
        print(f"\n{m} batch={b} device={a.device} threads={torch.get_num_threads()}")
        for v, t in r["median_step_s"].items():
            print(f"  {v:12s} {t * 1e3:10.2f} ms/step")
        for k, v in r["ratios"].items():
            print(f"  {k:22s} {v:6.2f}x")
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
