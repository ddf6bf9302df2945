"""FLOPs and bytes of the cost model against hand counts and published model counts."""

from __future__ import annotations

import pytest
import torch.nn as nn

from dpquant_sim.cost.flops import gemm_layer_ops, memory_bytes, scale_bytes, step_ops
from dpquant_sim.nn.shapes import trace_layers


def _gemm_flops(ops, layer=None):
    return {o.op: o.flops for o in ops if o.kind == "gemm" and (layer is None or o.layer == layer)}


def test_linear_flops_and_bytes_by_hand():
    (s,) = [x for x in trace_layers(nn.Sequential(nn.Linear(64, 32, bias=False)), (64,))]
    ops = gemm_layer_ops(s, 8, None, base="bf16", dp=False)
    # 2 * B * K * N = 2 * 8 * 64 * 32 = 32768 for each of the three GEMMs
    assert _gemm_flops(ops) == {"fwd": 32768, "dgrad": 32768, "wgrad": 32768}
    by = {o.op: o.bytes for o in ops}
    # fwd: x 8*64*2 + W 64*32*2 + y 8*32*2 = 1024 + 4096 + 512
    assert by["fwd"] == 5632
    # dgrad: dy 8*32*2 + W 4096 + dx 8*64*2 = 512 + 4096 + 1024
    assert by["dgrad"] == 5632
    # wgrad: dy 512 + x 1024 + the fp32 weight gradient 2048*4
    assert by["wgrad"] == 512 + 1024 + 2048 * 4
    # bf16 base: weight cast from fp32 master: read 2048*4, write 2048*2
    assert by["cast_w"] == 2048 * 6
    # DP, Opacus hooks: autograd's batch wgrad as above, plus the per-sample outer products dy_i x_i^T
    # (T = 1: a broadcasting multiply, B*K*N multiplies) written as 8 x 2048 fp32 per-sample gradients
    hooks = {o.op: o for o in gemm_layer_ops(s, 8, None, base="bf16", dp=True, clipping="hooks")}
    assert hooks["wgrad"].bytes == by["wgrad"] and hooks["wgrad"].flops == 32768
    assert hooks["psg_wgrad"].kind == "vector" and hooks["psg_wgrad"].flops == 8 * 64 * 32
    assert hooks["psg_wgrad"].bytes == 1024 + 512 + 8 * 2048 * 4


def test_linear_fp8_bytes_and_scales_by_hand():
    (s,) = trace_layers(nn.Sequential(nn.Linear(64, 32, bias=False)), (64,))
    ops = {o.op: o for o in gemm_layer_ops(s, 8, "fp8", base="bf16", dp=True, clipping="bk")}
    assert {k: o.precision for k, o in ops.items() if o.kind == "gemm"} == {"fwd": "fp8", "dgrad": "fp8", "wgrad": "fp8"}
    # fwd: x 8*64*1 + 8 per-sample fp32 scales; W 2048*1 + 32 per-channel fp32 scales; y 8*32*2 (bf16)
    assert ops["fwd"].bytes == (512 + 32) + (2048 + 128) + 512
    # quant_x: per-sample scale = amax pass + cast pass over bf16 input, write fp8 + scales
    assert ops["quant_x"].bytes == 2 * 512 * 2 + 512 + 32
    assert ops["quant_x"].launches == 2


def test_block_scale_bytes_by_hand():
    # MX: 1 E8M0 byte per 32 elements; NVFP4: 1 e4m3 byte per 16 + one fp32 per sample
    assert scale_bytes("mx", 100, 3) == 4 * 3  # ceil(100/32) = 4 blocks per sample
    assert scale_bytes("nvfp4", 100, 3) == 7 * 3 + 4 * 3
    assert scale_bytes("channel", 100, 3, channels=5) == 20
    (s,) = trace_layers(nn.Sequential(nn.Linear(64, 32, bias=False)), (64,))
    ops = {o.op: o for o in gemm_layer_ops(s, 4, "nvfp4", base="bf16")}
    # fwd: x 4*64*0.5 + 4*(4 + 4); W 2048*0.5 + 128 + 4; y 4*32*2
    assert ops["fwd"].bytes == (128 + 32) + (1024 + 132) + 256
    assert ops["quant_x"].launches == 1  # block scales are computed inside the block: one fused pass


@pytest.mark.parametrize(
    "conv,in_shape,fwd",
    [
        # H_out = (9 + 2 - 3) // 2 + 1 = 5: M = 25, K = 4*3*3 = 36, N = 8 -> 2*25*36*8
        (nn.Conv2d(4, 8, 3, stride=2, padding=1), (4, 9, 9), 14400),
        # groups=2: K = (4/2)*3*3 = 18 -> 2*25*18*8
        (nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), (4, 9, 9), 7200),
        # depthwise 3x3 on 6x6, no padding: H_out = 4, M = 16, K = 9, N = 6 -> 2*16*9*6
        (nn.Conv2d(6, 6, 3, groups=6), (6, 6, 6), 1728),
        # 1x1 stride 2 on 7x7, no padding: H_out = 4, M = 16, K = 3, N = 5 -> 2*16*3*5
        (nn.Conv2d(3, 5, 1, stride=2, bias=False), (3, 7, 7), 480),
    ],
)
def test_conv_flops_by_hand(conv, in_shape, fwd):
    (s,) = trace_layers(nn.Sequential(conv), in_shape)
    ops = gemm_layer_ops(s, 3, None, dp=False)
    assert _gemm_flops(ops) == {"fwd": 3 * fwd, "dgrad": 3 * fwd, "wgrad": 3 * fwd}
    # the per-sample weight gradients (hooks; mixed where it materialises) are B x groups batched GEMMs of the
    # same total FLOPs
    psg = [o for o in gemm_layer_ops(s, 3, None, clipping="hooks") if o.op == "psg_wgrad"][0]
    assert psg.flops == 3 * fwd and psg.dims[3] == 3 * conv.groups


def test_small_network_step_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    shapes = trace_layers(net, (1, 8, 8))
    # conv: M = 8*8 = 64, K = 9, N = 4 -> 4608 per example; linear: 2*64*10 = 1280 per example
    ops = step_ops(shapes, None, batch=2, dp=False)
    g = [(o.layer, o.op, o.flops) for o in ops if o.kind == "gemm"]
    # the first parametric layer needs no input gradient: conv has fwd + wgrad only
    assert g == [("0", "fwd", 9216), ("0", "wgrad", 9216), ("4", "fwd", 2560), ("4", "dgrad", 2560),
                 ("4", "wgrad", 2560)]
    assert sum(f for *_, f in g) == 2 * (2 * 4608 + 3 * 1280)
    # DP with Opacus hooks: autograd's GEMMs as above plus the conv's per-sample GEMMs (the linear layer's are
    # outer products, a vector op)
    ops = step_ops(shapes, None, batch=2, dp=True, clipping="hooks")
    g = [(o.layer, o.op, o.flops) for o in ops if o.kind == "gemm"]
    assert g == [("0", "fwd", 9216), ("0", "wgrad", 9216), ("0", "psg_wgrad", 9216), ("4", "fwd", 2560),
                 ("4", "dgrad", 2560), ("4", "wgrad", 2560)]
    # DP extras over P = (36 + 4) + (640 + 10) = 690 params, batch 2
    norm = [o for o in ops if o.op == "psg_norm"]
    assert sum(o.flops for o in norm) == 2 * 2 * 690  # square + add per per-sample gradient entry
    assert sum(o.bytes for o in norm) == 4 * 2 * 690 + 4 * 2 * 2  # read B x P fp32 (+ B norms per layer)
    noise = [o for o in ops if o.op == "noise"][0]
    assert noise.bytes == 12 * 690
    # non-GEMM layers: ReLU reads/writes 2*4*8*8 elements in bf16 forward
    relu_fwd = [o for o in ops if o.layer == "1" and o.op == "fwd_vec"][0]
    assert relu_fwd.bytes == (256 + 256) * 2 * 2


def test_memory_fit_by_hand():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    shapes = trace_layers(net, (10,))
    P = 10 * 20 + 20 + 20 * 5 + 5  # 325
    m = memory_bytes(shapes, None, batch=4, base="fp32", dp=True, optimizer="sgd", clipping="hooks")
    assert m.clip_held == 4 * 4 * P  # every per-sample gradient, fp32
    assert m.clip_transient == 0  # no conv: nothing unfolded
    assert m.weights == 4 * P and m.grads == 4 * P and m.optimizer_state == 0
    # saved activations (fp32): linear inputs 4*10 + 4*20, relu output 4*20
    assert m.activations == 4 * (40 + 80 + 80)
    assert m.total == 4 * P * 2 + 4 * 4 * P + 800
    # book-keeping holds every layer's output gradient instead (4*20 + 4*5 fp32) plus one block of norm
    # buffers: the largest layer's (T*d + 2*T^2) * B = (20 + 2) * 4 elements, fp32
    bk = memory_bytes(shapes, None, batch=4, base="fp32", dp=True, optimizer="sgd", clipping="bk")
    assert bk.clip_held == 4 * (80 + 20)
    assert bk.clip_transient == 4 * 4 * (20 + 2)
    assert bk.total == 4 * P * 2 + 800 + bk.clip_held + bk.clip_transient


def _gmacs(name, image_size, num_classes):
    from dpquant_sim.training.models import build_model

    m = build_model(name, in_channels=3, num_classes=num_classes, image_size=image_size)
    return sum(s.forward_flops for s in trace_layers(m, (3, image_size, image_size)) if s.is_gemm) / 2e9


def test_resnet18_imagenet_macs_match_torchvision():
    # torchvision resnet18 at 3x224x224: 1.81 GFLOPS (multiply-accumulates), published in its model table
    assert _gmacs("resnet18", 224, 1000) == pytest.approx(1.814, rel=0.01)


def test_resnet50_imagenet_macs_match_published():
    # torchvision resnet50 (v1.5) at 3x224x224: 4.09 GMACs (often quoted 4.1)
    assert _gmacs("resnet50", 224, 1000) == pytest.approx(4.09, rel=0.01)


def test_resnet18_cifar_macs_match_published():
    # CIFAR ResNet18 (3x3 stem, no max-pool) at 32x32: ~0.56 GMACs
    assert _gmacs("resnet18", 32, 10) == pytest.approx(0.556, rel=0.01)
