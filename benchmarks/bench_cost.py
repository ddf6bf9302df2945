"""Points per second of the vectorized cost sweep vs the scalar per-point loop (ratio in the same run).

    .venv/bin/python benchmarks/bench_cost.py [--plans 200] [--scalar-points 200] [--devices 1,8,64]

Workload: ResNet18 (CIFAR, 3x32x32), random plans (each layer quantized with probability 0.5 in a random
recipe), all shipped accelerator profiles, batch sizes 64/256/1024, data-parallel device counts (default 1).
The scalar loop runs dpquant_sim.cost.model.step_cost on a random subset of the same points (same answers,
tested); points a profile's interconnect cannot reach are skipped in the check.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=200)
    ap.add_argument("--scalar-points", type=int, default=200)
    ap.add_argument("--devices", default="1", help="comma-separated device counts")
    args = ap.parse_args()
    devices = [int(d) for d in args.devices.split(",")]

    from dpquant_sim.cost.model import step_cost
    from dpquant_sim.cost.profiles import load_profiles
    from dpquant_sim.cost.run import build_shapes
    from dpquant_sim.cost.sweep import sweep

    shapes = build_shapes("resnet18", (3, 32, 32), 10)
    layers = [s.name for s in shapes if s.is_gemm]
    rng = np.random.default_rng(0)
    recipes = ["fp8", "fp4", "mxfp8", "nvfp4", "int8"]
    plans = [{n: str(rng.choice(recipes)) for n in layers if rng.random() < 0.5} for _ in range(args.plans)]
    profs = list(load_profiles().values())
    batches = [64, 256, 1024]

    sweep(shapes, plans[:2], profs, batches, devices=devices)  # warm-up (imports, recipe lookups)
    t0 = time.perf_counter()
    res = sweep(shapes, plans, profs, batches, devices=devices)
    t_vec = time.perf_counter() - t0
    n_vec = int(res.feasible.sum()) * len(plans) * len(batches)

    idx = []
    while len(idx) < args.scalar_points:
        i, h, b, d = (int(rng.integers(n)) for n in (len(plans), len(profs), len(batches), len(devices)))
        if res.feasible[h, d]:
            idx.append((i, h, b, d))
    t0 = time.perf_counter()
    worst = 0.0
    for i, h, b, d in idx:
        sc = step_cost(shapes, plans[i], profs[h], batch=batches[b], devices=devices[d])
        worst = max(worst, abs(sc.roofline_s / res.roofline_s[i, h, b, d] - 1))
    t_sca = time.perf_counter() - t0
    v, s = n_vec / t_vec, len(idx) / t_sca
    print(f"vectorized sweep: {n_vec} points ({len(plans)} plans x {len(profs)} profiles x {len(batches)} batches "
          f"x devices {devices}, feasible only) in {t_vec:.3f} s = {v:,.0f} points/s")
    print(f"scalar loop:      {len(idx)} points in {t_sca:.3f} s = {s:,.1f} points/s")
    print(f"speedup: {v / s:,.0f}x; max relative difference on the checked points: {worst:.1e}")


if __name__ == "__main__":
    main()
