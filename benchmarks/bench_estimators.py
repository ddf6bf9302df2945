"""Wall-clock of one dpquant sensitivity estimate: the training estimator against the forward one, same run.

Times the rows of one estimate (the privatisation after them is negligible) for ``estimator: forward`` and
``estimator: training`` on an untrained model of the given kind, on random inputs, at sample rate ``--q`` over
``--n`` examples, the two interleaved ``--repeats`` times; prints per estimator the median seconds per estimate
and per sampled example, and the ratio training / forward (medians). The training estimator's step size is a
DP-SGD run's default share (2.0 / 256); it does not change the cost.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_estimators.py --model resnet18-w16 --recipe luq_fp4
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_estimators.py --model cnn --image-size 8 --channels 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    import dpquant_sim.nn as qnn
    from dpquant_sim.nn.shapes import gemm_layers
    from dpquant_sim.training.models import build_model
    from dpquant_sim.training.sensitivity import make_loss_delta_fn
    from dpquant_sim.training.sensitivity_training import make_training_delta_fn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18-w16")
    p.add_argument("--recipe", default="fp4")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n", type=int, default=400, help="training-set size the sample is drawn from")
    p.add_argument("--q", type=float, default=0.05, help="the estimator's Poisson rate")
    p.add_argument("--iters", type=int, default=1, help="training estimator: short steps per policy")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args.model, in_channels=args.channels, num_classes=10, image_size=args.image_size)
    model = qnn.convert_model(model, seed=0).to(args.device)
    if args.device != "cpu":
        qnn.set_generators(model, 0)
    shape = (args.channels, args.image_size, args.image_size)
    data = torch.utils.data.TensorDataset(torch.randn(args.n, *shape), torch.randint(0, 10, (args.n,)))
    names = [s.name for s in gemm_layers(model, shape)]
    fns = {
        "forward": lambda g: make_loss_delta_fn(model, data, recipe=args.recipe, device=args.device)(names, args.q, g),
        "training": lambda g: make_training_delta_fn(model, data, recipe=args.recipe, lr=2.0 / 256, grad_clip=1.0,
                                                     device=args.device)(names, args.q, g, iters=args.iters),
    }
    fns["forward"](torch.Generator().manual_seed(999))  # warm-up (first-call costs)
    secs: dict[str, list[float]] = {k: [] for k in fns}
    per_ex: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        for k, f in fns.items():
            if args.device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            d, _ = f(torch.Generator().manual_seed(r))
            if args.device != "cpu":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            secs[k].append(dt)
            per_ex[k].append(dt / max(int(d.shape[0]), 1))
    out = {"model": args.model, "recipe": args.recipe, "layers": len(names), "n": args.n, "q": args.q,
           "iters": args.iters, "repeats": args.repeats, "device": args.device,
           "threads": torch.get_num_threads()}
    for k in fns:
        out[k] = {"seconds_per_estimate": float(np.median(secs[k])),
                  "seconds_per_sampled_example": float(np.median(per_ex[k]))}
    out["ratio_training_over_forward"] = out["training"]["seconds_per_estimate"] / out["forward"]["seconds_per_estimate"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
