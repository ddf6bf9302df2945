"""The cost model's per-layer matmul FLOPs against torch's ``FlopCounterMode`` on the engine's own DP step.

One DP step of a clipping algorithm (``dpquant_sim.training.clipping``) runs on a converted model under a
``FlopCounterMode`` whose counts are attributed to layers: autograd nodes created by a layer's forward call
(its forward, input- and weight-gradient kernels, its backward hooks, where the norms are computed) carry the
layer's label, and so do the per-layer clipping calls made outside the backward pass (book-keeping's weighted
sums, Opacus's clip-and-accumulate per parameter, a first layer's hooks that fire at its output gradient).
Work outside every layer is labelled ``<outside>``. torch's own module tracker is not used: it refuses the
``autograd.grad`` w.r.t. a leaf input that book-keeping and ghost clipping run.

``FlopCounterMode`` counts matmul-like kernels only (mm, addmm, bmm, convolution and its backward), 2 FLOPs per
multiply-accumulate (its grouped-conv weight-gradient formula is corrected here, see
:func:`grouped_conv_backward_flop`). The comparison therefore covers the cost model's GEMM ops (fwd, dgrad,
dgrad2, wgrad, psg_wgrad, gram_x, gram_dy) plus ``clip_sum`` (a vector op in the model, an
``einsum('i,i...')`` GEMV in the implementation); elementwise work (quantizers, norms, im2col copies, clip scaling, bias sums, the T = 1 outer
products of per-sample linear gradients, which torch runs as a broadcasting multiply) is not counted by torch
and is checked against hand counts in the tests instead. Both sides count exact integers, so the tolerance is
exact equality.

    .venv/bin/python -m dpquant_sim.cost.flopcheck --model resnet18-w16 --input 3x32x32 --batch 2 --recipe fp8

>>> rows = compare("cnn", (1, 8, 8), batch=3, algorithms=("bk",))
>>> all(r["torch"] == r["model"] for r in rows)
True
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import warnings
from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS

OUTSIDE = "<outside>"
COUNTED_VECTOR_OPS = frozenset({"clip_sum"})  # vector ops in the model that the implementation runs as a matmul


def counted_by_torch(op) -> bool:
    """Whether FlopCounterMode counts this cost-model op (see the module docstring)."""
    return op.kind == "gemm" or op.op in COUNTED_VECTOR_OPS


class _NoTracker:
    parents: set = set()

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's convolution_backward formula with the weight-gradient term divided by ``groups``: torch 2.13
    counts a grouped conv's weight gradient as if it were dense over the channels (groups times too many; fixed
    upstream in pytorch/pytorch#183405). The engine's materialised per-sample conv gradients are one grouped
    wgrad with the batch folded into the groups, so this matters here."""
    from torch.utils.flop_counter import conv_backward_flop

    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    weight = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
    rest = conv_backward_flop(*args, [output_mask[0], False, output_mask[2]], out_val=out_shape)
    return weight // max(int(groups), 1) + rest


class LayerFlopCounter(FlopCounterMode):
    """FlopCounterMode that attributes each counted kernel to the innermost active layer label (with the grouped
    conv weight-gradient formula corrected, :func:`grouped_conv_backward_flop`)."""

    def __init__(self) -> None:
        super().__init__(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: grouped_conv_backward_flop})
        self.mod_tracker = _NoTracker()
        self.stack: list[str] = []
        self.param_label: str | None = None  # set while Opacus clips one parameter's per-sample gradients
        self.by_layer: dict[str, int] = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            label = self.stack[-1] if self.stack else (self.param_label or OUTSIDE)
            self.by_layer[label] += int(n)
        return out

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()


def _graph_nodes(outputs: Any, stop: set) -> set:
    """Autograd nodes reachable from ``outputs`` without passing a node in ``stop`` (a call's own nodes)."""
    todo = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    seen: set = set()
    while todo:
        n = todo.pop()
        if n is None or n in stop or n in seen or type(n).__name__ == "AccumulateGrad":
            continue
        seen.add(n)
        todo.extend(nxt for nxt, _ in n.next_functions)
    return seen


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


@contextlib.contextmanager
def labelled_layers(model: nn.Module, counter: LayerFlopCounter) -> Iterator[None]:
    """Label every leaf module's forward call, its autograd nodes and, where its input needs no gradient (the
    first layer), its full-backward hooks, which then fire at the output gradient."""
    handles = []
    for name, m in model.named_modules():
        if list(m.children()) or not name:
            continue
        state: dict[str, Any] = {}

        def pre(mod, args, name=name, state=state):
            state["stop"] = {t.grad_fn for t in _tensors(args) if t.grad_fn is not None}
            state["no_input_grad"] = not any(t.requires_grad for t in _tensors(args))
            counter.stack.append(name)

        def post(mod, args, out, name=name, state=state):
            counter.stack.pop()
            for node in _graph_nodes(out, state["stop"]):
                node.register_prehook(lambda g, name=name: counter.stack.append(name))  # returns None
                node.register_hook(lambda gi, go: (counter.stack.pop(), None)[1])

        handles.append(m.register_forward_pre_hook(pre, prepend=True))
        handles.append(m.register_forward_hook(post))
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            def bw_pre(mod, grad_out, name=name, state=state):
                state["bw"] = state.get("no_input_grad", False)
                if state["bw"]:
                    counter.stack.append(name)

            def bw_post(mod, grad_in, grad_out, state=state):
                if state.pop("bw", False):
                    counter.stack.pop()

            handles.append(m.register_full_backward_pre_hook(bw_pre))
            handles.append(m.register_full_backward_hook(bw_post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _LabelledOps:
    """A layer's ClipOps whose calls run under the layer's label."""

    def __init__(self, ops, name: str, counter: LayerFlopCounter):
        self.ops, self.name, self.counter = ops, name, counter

    def record(self, *args, **kwargs):
        with self.counter.label(self.name):
            return self.ops.record(*args, **kwargs)

    def weighted_sum(self, *args, **kwargs):
        with self.counter.label(self.name):
            return self.ops.weighted_sum(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.ops, attr)


def measure(model: nn.Module, algorithm: str, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> dict[str, int]:
    """Matmul FLOPs per layer name of one DP step of ``algorithm`` (a clipping algorithm of the engine) on a
    converted ``model`` with the batch ``(x, y)``."""
    from dpquant_sim.training.clipping import build_clipping

    names = {m: n for n, m in model.named_modules()}
    owner = {p: names[m] for m in model.modules() for p in m.parameters(recurse=False)}
    clip = build_clipping(algorithm, model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=len(y),
                          generator=torch.Generator().manual_seed(seed))
    counter = LayerFlopCounter()
    rec = getattr(clip, "rec", None)
    if rec is not None:  # book-keeping / ghost: per-layer ClipOps calls
        rec.ops = {m: _LabelledOps(o, names[m], counter) for m, o in rec.ops.items()}
    opt = getattr(clip, "optimizer", None)
    if opt is not None and hasattr(opt, "_get_flat_grad_sample"):  # Opacus's clip-and-accumulate per parameter
        flat = opt._get_flat_grad_sample

        def labelled_flat(p):
            counter.param_label = owner.get(p)
            return flat(p)

        opt._get_flat_grad_sample = labelled_flat
    qz = importlib.import_module("dpquant_sim.numerics.quantize")  # the module (the package exports a function)
    backend = qz.default_backend()
    qz.set_default_backend("torch")  # same bits; a compiled quantizer cannot trace under a dispatch mode
    try:
        with labelled_layers(model, counter), counter, warnings.catch_warnings():
            # the labels' own backward hooks on a first layer fire at its output gradient: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            clip.step([(x, y)], None)
    finally:
        qz.set_default_backend(backend)
        counter.param_label = None
        clip.close()
    return dict(counter.by_layer)


def compare(model_name: str, input_shape: Sequence[int], *, batch: int = 4, recipe: str | None = None,
            algorithms: Sequence[str] = CLIPPING_ALGORITHMS, num_classes: int = 10, seed: int = 0) -> list[dict]:
    """One row per (algorithm, layer): FLOPs counted by torch and by the cost model (``step_ops``) for one DP
    step of ``batch`` examples with every quantizable layer in ``recipe`` (None: full precision)."""
    import dpquant_sim.nn as qnn
    from dpquant_sim.cost.flops import step_ops
    from dpquant_sim.nn.shapes import trace_layers
    from dpquant_sim.training.models import build_model

    rows = []
    for algo in algorithms:
        torch.manual_seed(seed)
        net = build_model(model_name, in_channels=input_shape[0], num_classes=num_classes,
                          image_size=input_shape[-1])
        model = qnn.convert_model(net, seed=seed)
        shapes = trace_layers(model, tuple(input_shape))
        plan = {} if recipe is None else {s.name: recipe for s in shapes if s.is_gemm}
        for s in shapes:
            if s.is_gemm and recipe is not None:
                model.get_submodule(s.name).qconfig = recipe
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *input_shape, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        got = measure(model, algo, x, y, seed=seed)
        want: dict[str, float] = defaultdict(float)
        for o in step_ops(shapes, plan, batch=batch, clipping=algo):
            if counted_by_torch(o):
                want[o.layer] += o.flops
        for layer in dict.fromkeys([s.name for s in shapes if s.params > 0] + sorted(set(got) - set(want))):
            rows.append({"algorithm": algo, "layer": layer, "torch": int(got.get(layer, 0)),
                         "model": int(round(want.get(layer, 0.0)))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--input", default="1x8x8", help="per-example input shape CxHxW")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--recipe", default=None, help="quantize every layer with this recipe (default: none)")
    ap.add_argument("--algorithms", default=",".join(CLIPPING_ALGORITHMS))
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.input.split("x"))
    rows = compare(a.model, shape, batch=a.batch, recipe=a.recipe, algorithms=a.algorithms.split(","))
    bad = [r for r in rows if r["torch"] != r["model"]]
    print(f"{'algorithm':9s} {'layer':28s} {'torch FLOPs':>16s} {'model FLOPs':>16s}  match")
    for r in rows:
        print(f"{r['algorithm']:9s} {r['layer']:28s} {r['torch']:16,d} {r['model']:16,d}  "
              f"{'yes' if r['torch'] == r['model'] else 'NO'}")
    tot = defaultdict(lambda: [0, 0])
    for r in rows:
        tot[r["algorithm"]][0] += r["torch"]
        tot[r["algorithm"]][1] += r["model"]
    for algo, (t, m) in tot.items():
        print(f"{algo:9s} {'(all layers)':28s} {t:16,d} {m:16,d}  {'yes' if t == m else 'NO'}")
    print(f"{len(rows) - len(bad)} of {len(rows)} (algorithm, layer) pairs equal")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
