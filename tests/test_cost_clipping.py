"""The cost of each DP clipping algorithm: hand counts per op, the per-layer choice of `mixed` against the
engine's, memory, the registry against the engine's, and every GEMM FLOP against torch's FlopCounterMode run on
the engine's own DP step."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS, norm_method
from dpquant_sim.cost.clipping import CLIP_COST, layer_dims, parse_clipping
from dpquant_sim.cost.flops import gemm_layer_ops, memory_bytes, step_ops
from dpquant_sim.errors import ConfigError
from dpquant_sim.nn.shapes import trace_layers
from tests.test_cost_cli import _cli

# One conv layer with bias, not the first layer: C_in 4 -> C_out 8, 3x3, padding 1 on 6x6, batch 2.
# Per example: T = 36 positions, d = 4*9 = 36, p = 8; weight 288, bias 8; input 144, output 288 elements.
CONV = trace_layers(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), (4, 6, 6))[0]
B, T, D, P_, W, BIAS = 2, 36, 36, 8, 288, 8
X = B * 144 * 2  # activations, bf16: 576 bytes
DY = B * 288 * 2  # output gradients, bf16: 1152 bytes
COLS = B * D * T * 2  # im2col columns, bf16: 5184 bytes
GEMM = 2 * B * T * D * P_  # 41472 FLOPs for each of fwd / dgrad / wgrad / per-sample GEMMs
GRAM = B * T * T  # elements of one batch of T x T Gram matrices


def _ops(clipping, needs_dgrad=True):
    ops = gemm_layer_ops(CONV, B, None, base="bf16", dp=True, needs_dgrad=needs_dgrad, clipping=clipping)
    return {o.op: o for o in ops}, [o.op for o in ops]


def test_hooks_conv_by_hand():
    ops, names = _ops("hooks")
    assert names == ["cast_w", "fwd", "dgrad", "wgrad", "bias_grad", "im2col", "psg_wgrad", "psg", "psg_norm",
                     "clip_sum"]
    assert ops["wgrad"].flops == GEMM and ops["wgrad"].bytes == DY + X + W * 4  # autograd's, then discarded
    # Opacus unfold2d: a padded copy of the input (read + write), read again and written as columns
    assert ops["im2col"].bytes == 3 * X + COLS and ops["im2col"].flops == 0
    psg = ops["psg_wgrad"]  # B batched p x T x d GEMMs reading the columns, written as fp32
    assert psg.kind == "gemm" and psg.flops == GEMM and psg.dims == (8, 36, 36, 2)
    assert psg.bytes == COLS + DY + B * W * 4
    assert ops["psg"].flops == B * T * P_ and ops["psg"].bytes == DY + B * BIAS * 4
    P = W + BIAS  # norms and the clipped sum over every per-sample gradient, at the optimizer step
    assert ops["psg_norm"].flops == 2 * B * P and ops["psg_norm"].bytes == 4 * B * P + 4 * B
    assert ops["clip_sum"].flops == 2 * B * P and ops["clip_sum"].bytes == 4 * B * P + 4 * P + 4 * B
    assert ops["psg_norm"].phase == ops["clip_sum"].phase == "step"


def test_bk_conv_by_hand():
    ops, names = _ops("bk")
    assert names == ["cast_w", "fwd", "dgrad", "im2col", "gram_x", "gram_dy", "ghost_norm", "psg", "clip_scale",
                     "wgrad", "bias_sum"]
    assert ops["im2col"].bytes == X + COLS  # F.unfold pads on the fly: read the input, write the columns
    assert ops["gram_x"].flops == 2 * GRAM * D and ops["gram_x"].dims == (36, 36, 36, 2)
    assert ops["gram_x"].bytes == COLS + 4 * GRAM  # fp32 T x T out
    assert ops["gram_dy"].flops == 2 * GRAM * P_ and ops["gram_dy"].bytes == DY + 4 * GRAM
    # <X X^T, dY dY^T>: a multiply kernel (read 2, write 1) then a sum (read 1), fp32
    assert ops["ghost_norm"].flops == 2 * GRAM and ops["ghost_norm"].bytes == 16 * GRAM + 4 * B
    assert ops["psg"].flops == B * T * P_ + 2 * B * BIAS  # per-sample bias gradients and their squares
    assert ops["clip_scale"].flops == B * 288 and ops["clip_scale"].bytes == 2 * DY
    assert ops["wgrad"].flops == GEMM and ops["wgrad"].bytes == DY + X + W * 4  # ONE weighted GEMM
    assert ops["bias_sum"].flops == B * T * P_
    assert {ops[n].phase for n in ("clip_scale", "wgrad", "bias_sum")} == {"clip"}
    assert {ops[n].phase for n in ("dgrad", "im2col", "gram_x", "gram_dy", "ghost_norm", "psg")} == {"bwd"}


def test_mixed_conv_by_hand():
    # 2 T^2 = 2592 >= p d = 288: the per-sample gradient is materialised (the conv wgrad kernel with the batch
    # folded into the groups reads x itself: no im2col) and squared
    assert norm_method(T, D, P_, algorithm="mixed") == "materialize"
    ops, names = _ops("mixed")
    assert names == ["cast_w", "fwd", "dgrad", "psg_wgrad", "psg_norm", "psg", "clip_scale", "wgrad", "bias_sum"]
    assert ops["psg_wgrad"].flops == GEMM and ops["psg_wgrad"].bytes == X + DY + B * W * 4
    assert ops["psg_norm"].flops == 2 * B * W and ops["psg_norm"].phase == "bwd"


def test_ghost_conv_by_hand():
    ops, names = _ops("ghost")
    assert names == ["cast_w", "fwd", "dgrad", "im2col", "gram_x", "gram_dy", "ghost_norm", "psg", "dgrad2",
                     "wgrad", "bias_grad"]
    assert ops["dgrad2"].flops == GEMM and ops["dgrad2"].phase == "clip"  # the second backward pass
    assert ops["wgrad"].phase == ops["bias_grad"].phase == "clip"
    # a quantized layer replays c_i q(dy_i): one scaling pass, roofline-only (quantization overhead)
    q = {o.op: o for o in gemm_layer_ops(CONV, B, "fp8", clipping="ghost")}
    assert q["replay_scale"].theo is False and q["replay_scale"].flops == B * 288
    assert q["gram_x"].precision == "fp8" and q["gram_dy"].precision == "fp8"


@pytest.mark.parametrize("clipping", CLIPPING_ALGORITHMS)
def test_first_layer_input_gradient(clipping):
    """Autograd (hooks) skips the first layer's input gradient; the engine's bk/mixed/ghost differentiate
    w.r.t. the model input, so pass 1 computes it; ghost's second pass (w.r.t. the parameters) does not."""
    _, names = _ops(clipping, needs_dgrad=False)
    assert names.count("dgrad") == (0 if clipping == "hooks" else 1)
    assert "dgrad2" not in names


def test_ghost_back_propagates_non_gemm_layers_twice():
    shapes = trace_layers(nn.Sequential(nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 3)), (8,))
    for clipping, passes in (("hooks", 1), ("bk", 1), ("mixed", 1), ("ghost", 2)):
        ops = step_ops(shapes, None, batch=4, clipping=clipping)
        relu = [o.op for o in ops if o.layer == "2"]
        assert relu.count("bwd_vec") + relu.count("bwd_vec2") == passes
        gn = [o.op for o in ops if o.layer == "1"]  # GroupNorm: Opacus's sampler under every algorithm
        assert "psg" in gn and "psg_norm" in gn
        assert ("clip_sum" in gn) == (clipping != "ghost")  # ghost gets the sum from its second pass
        assert ("param_grad" in gn) == (clipping in ("hooks", "ghost"))  # autograd's plain gradient


def test_mixed_chooses_per_layer_as_the_engine_does():
    """The cost model's (T, d, p) of every quantizable layer equals the engine's (``clip_ops.shape_dims`` on the
    real tensors), so ``norm_method`` picks the same method in both; and by hand for ResNet18 on 32x32."""
    import dpquant_sim.nn as qnn
    from dpquant_sim.nn.clip_ops import shape_dims
    from dpquant_sim.nn.layers import QUANT_LAYER_TYPES
    from dpquant_sim.training.models import build_model

    model = qnn.convert_model(build_model("resnet18", in_channels=3, num_classes=10, image_size=32), seed=0)
    seen = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, a, y: seen.__setitem__(names[m], shape_dims(m, a[0].shape, y.shape)))
             for m in model.modules() if isinstance(m, QUANT_LAYER_TYPES)]
    with torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    shapes = [s for s in trace_layers(model, (3, 32, 32)) if s.is_gemm]
    assert {s.name: layer_dims(s)[:3] for s in shapes} == seen
    ops = step_ops(shapes, None, batch=4, clipping="mixed")
    for s in shapes:
        method = norm_method(*seen[s.name], algorithm="mixed")
        layer_ops = {o.op for o in ops if o.layer == s.name}
        assert ("psg_wgrad" in layer_ops) == (method == "materialize")
        assert ("ghost_norm" in layer_ops) == (method == "ghost")
    by_name = {s.name: norm_method(*layer_dims(s)[:3], algorithm="mixed") for s in shapes}
    # layer1: T = 32*32, d = 64*9, p = 64: 2 T^2 = 2.1M >= 36.9k; layer4: T = 4*4; the fc: T = 1
    assert by_name["layer1.0.conv1"] == "materialize" and by_name["layer4.0.conv2"] == "ghost"
    assert by_name["fc"] == "ghost"


def test_held_memory_by_algorithm():
    """What each algorithm holds until clipping, on a two-layer MLP in fp32 (B = 4, P = 325)."""
    shapes = trace_layers(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)), (10,))
    held = {a: memory_bytes(shapes, None, batch=4, base="fp32", clipping=a).clip_held for a in CLIPPING_ALGORITHMS}
    assert held["hooks"] == 4 * 4 * 325  # every per-sample gradient
    assert held["bk"] == held["mixed"] == 4 * 4 * (20 + 5)  # every layer's output gradient
    assert held["ghost"] == 0  # unquantized: nothing kept beyond the retained graph
    q = memory_bytes(shapes, {"2": "fp8"}, batch=4, base="fp32", clipping="ghost")
    assert q.clip_held == 4 * 5 * 1 + 4 * 4  # the quantized layer's q(dy) for the replay: fp8 + per-sample scales


def test_transient_is_the_largest_layer_block():
    """Norm buffers are blocked over examples (clipping_rules.norm_block_examples): only the largest layer's
    block counts, and it never exceeds max(the layer's operand size, 2^18 elements) by more than one example."""
    conv = trace_layers(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), (64, 32, 32))
    B = 256
    for algo, per in (("bk", 1024 * 576 + 2 * 1024 * 1024), ("mixed", 64 * 576 + 1024 * 576)):
        m = memory_bytes(conv, None, batch=B, clipping=algo)
        budget = B * 64 * 1024  # the layer's input (= output) elements
        block = max(1, budget // per)  # examples per block
        assert m.clip_transient == 4 * block * per
    assert memory_bytes(conv, None, batch=B, clipping="hooks").clip_transient == 4 * B * 576 * 1024  # unfold


def test_parse_clipping():
    assert parse_clipping("all") == CLIPPING_ALGORITHMS
    assert parse_clipping(["bk", "hooks,bk"]) == ("bk", "hooks")
    for bad in ("fast", ["bk", "nope"], "", 3):
        with pytest.raises(ConfigError, match="clipping"):
            parse_clipping(bad)
    assert set(CLIP_COST) == set(CLIPPING_ALGORITHMS)


# ------------------------------------------------------------------------------ FlopCounterMode on the engine
def test_grouped_conv_weight_gradient_flops_by_hand():
    """torch 2.13's formula counts a grouped conv's weight gradient groups times over; the corrected one gives
    the hand count 2 * N * (C_out) * (C_in / groups) * kh * kw * H_out * W_out."""
    from torch.utils.flop_counter import FlopCounterMode

    from dpquant_sim.cost.flopcheck import LayerFlopCounter

    x, dy = torch.randn(2, 8, 6, 6), torch.randn(2, 12, 6, 6)
    hand = 2 * 2 * 12 * (8 // 4) * 9 * 36
    with LayerFlopCounter() as ours:
        torch.nn.grad.conv2d_weight(x, (12, 2, 3, 3), dy, 1, 1, 1, 4)
    with FlopCounterMode(display=False) as theirs:
        torch.nn.grad.conv2d_weight(x, (12, 2, 3, 3), dy, 1, 1, 1, 4)
    assert ours.by_layer["<outside>"] == hand
    assert theirs.get_total_flops() == 4 * hand  # why the correction exists; drop it once torch counts groups


@pytest.mark.parametrize("model,shape,recipe", [("cnn", (1, 8, 8), "fp8"), ("mlp", (1, 8, 8), None)])
def test_gemm_flops_match_flopcountermode_per_layer(model, shape, recipe):
    """Every layer's matmul FLOPs of one DP step of every clipping algorithm, run by the engine under torch's
    FlopCounterMode, equal the cost model's (exact integers: fwd, dgrad, dgrad2, wgrad, per-sample GEMMs, Gram
    matrices, Opacus's clip-and-accumulate einsums). Elementwise work is not counted by torch (module docstring
    of dpquant_sim.cost.flopcheck)."""
    from dpquant_sim.cost.flopcheck import OUTSIDE, compare

    rows = compare(model, shape, batch=3, recipe=recipe)
    assert {r["algorithm"] for r in rows} == set(CLIPPING_ALGORITHMS)
    bad = [r for r in rows if r["torch"] != r["model"]]
    assert not bad, bad
    assert all(r["layer"] != OUTSIDE for r in rows)  # nothing counted outside a layer
    assert all(r["torch"] > 0 for r in rows if r["layer"].startswith(("conv", "fc", "head")))


@pytest.mark.slow
def test_gemm_flops_match_flopcountermode_resnet18_w16():
    from dpquant_sim.cost.flopcheck import compare

    rows = compare("resnet18-w16", (3, 32, 32), batch=2, recipe="fp8")
    assert len(rows) >= 4 * 41 and all(r["torch"] == r["model"] for r in rows)


# ------------------------------------------------------------------------------ CLI and runs
def test_cost_cli_dp_algorithm_axis(capsys):
    argv = ["cost", "--model", "cnn", "--input", "1x8x8", "--batch-size", "64", "--accelerators", "h100_sxm,b200",
            "--json"]
    code, out, err = _cli(capsys, *argv, "--dp-algorithm", "all")  # the old name (hidden, deprecated) still works
    assert code == 0 and "note: --dp-algorithm is deprecated" in err
    res = json.loads(out)
    keys = {(r["hw"], r["clipping"], r["format"]) for r in res["results"]}
    assert keys == {(h, a, f) for h in ("h100_sxm", "b200") for a in CLIPPING_ALGORITHMS for f in ("fp8", "fp4")}
    assert set(res["plans"]) == {"fp8", "fp4"}
    same = json.loads(_cli(capsys, *argv, "--clipping", "ghost,bk", "--recipe", "fp8")[1])["results"]
    assert [r["clipping"] for r in same] == ["ghost", "bk", "ghost", "bk"]
    for r in same:  # the same numbers under either spelling
        twin = [x for x in res["results"] if (x["hw"], x["clipping"], x["format"]) == (r["hw"], r["clipping"], "fp8")]
        assert twin[0]["roofline_s"] == r["roofline_s"]
    code, out, _ = _cli(capsys, *argv[:-1], "--dp-algorithm", "all")
    assert code == 0 and "speedup over bf16" in out and "fp4 mixed" in out
    code, _, err = _cli(capsys, *argv, "--clipping", "fast")
    assert code == 2 and "--clipping='fast'" in err and len(err.strip().splitlines()) == 1


def test_cost_run_costs_the_runs_own_algorithm(tmp_path):
    from dpquant_sim.cost.model import step_cost
    from dpquant_sim.cost.profiles import get_profile
    from tests.test_cost_cli import _fake_run

    shapes, plans, _ = _fake_run(tmp_path, kind="random")
    info = json.loads((tmp_path / "run_info.json").read_text())
    (tmp_path / "run_info.json").write_text(json.dumps({**info, "clipping": "bk"}))
    from dpquant_sim.cost.run import cost_run

    df = cost_run(tmp_path, ["h100_sxm"])
    assert set(df["clipping_run"]) == set(df["clipping_costed"]) == {"bk"}
    sc = step_cost(shapes, plans[2], get_profile("h100_sxm"), batch=100.0, optimizer="momentum", clipping="bk")
    assert df[df["epoch"] == 2]["time_roofline_s"].iloc[0] == pytest.approx(10 * sc.roofline_s, rel=1e-9)
    every = cost_run(tmp_path, ["h100_sxm"], clipping="all")
    assert len(every) == 3 * 4 and set(every["clipping_run"]) == {"bk"}
    assert list(every[every["epoch"] == 0]["clipping_costed"]) == list(CLIPPING_ALGORITHMS)
    with pytest.raises(ConfigError, match="clipping='nope'"):
        cost_run(tmp_path, ["h100_sxm"], clipping="nope")


# ------------------------------------------------------------------------------ sweeps and the report
def test_sweep_yaml_cost_clipping_collect_and_report(tmp_path):
    """`cost_clipping` in a sweep YAML costs every run under those algorithms (one accelerator option per
    algorithm), and the report shows the speedup over bf16 per accelerator and algorithm."""
    import pandas as pd

    from dpquant_sim.analysis.report import build_report
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_sweep_runner import RAW, fake_point

    with pytest.raises(ConfigError, match="cost_clipping"):
        SweepConfig.from_dict({**RAW, "cost_clipping": ["bk", "fast"]})
    cfg = SweepConfig.from_dict({**RAW, "cost_clipping": "hooks,bk", "grid": {"schedule": [{"kind": "static-all"}]}})
    res = run_sweep(cfg, tmp_path, workers=1, point_fn=fake_point, progress=False)
    t = res.table
    assert set(t["clipping_costed"]) == {"hooks", "bk"} and set(t["clipping_run"]) == {"mixed"}
    assert set(t["accelerator"]) == {f"{h} ({a})" for h in ("h100_sxm", "b200") for a in ("hooks", "bk")}
    path = build_report(tmp_path)
    html = path.read_text(encoding="utf-8")
    assert 'id="fig-speedup_by_clipping"' in html and "Where low precision pays" in html
    data = pd.read_csv(tmp_path / "report_data" / "speedup_by_clipping.csv")
    assert set(data["clipping"]) == {"hooks", "bk"} and set(data["hw"]) == {"h100_sxm", "b200"}
    # the whole-run speedup is the bf16 run's time over this run's, epoch by epoch summed
    row = t[(t["accelerator"] == "b200 (bk)")]
    want = (row["time_roofline_s"] * row["speedup_vs_bf16_roofline"]).sum() / row["time_roofline_s"].sum()
    got = data[(data["clipping"] == "bk") & (data["hw"] == "b200")]["roofline"].iloc[0]
    assert got == pytest.approx(want, rel=1e-9)
    # re-costed under every algorithm on request, beside the report
    build_report(tmp_path, out=tmp_path / "all.html", clipping="all")
    derived = pd.read_csv(tmp_path / "all_results.csv")
    assert set(derived["clipping_costed"]) == set(CLIPPING_ALGORITHMS)
