"""Data-parallel gradient all-reduce over a profile's interconnect (ring and tree; hierarchical across nodes).

With N data-parallel devices each step, every device runs the forward and backward pass on B/N examples, clips
its examples' gradients locally (per-sample clipping needs nothing from other devices), and the clipped sums
(fp32, one per parameter) are all-reduced. DP noise is added ONCE, after the reduction (every replica draws
the same noise from a shared seed, so the noisy sum is identical everywhere): adding noise on each device
before the reduction would add N times the variance the accountant assumes. Then every device applies the same
optimizer update.

Times (``bw``: per-device bandwidth in one direction, ``lat``: per-step latency):

* ring all-reduce (reduce-scatter + all-gather): 2 (N-1)/N * bytes / bw + 2 (N-1) lat
* (double binary) tree all-reduce, pipelined: 2 * bytes / bw + 2 ceil(log2 N) lat
  (NCCL 2.4: https://developer.nvidia.com/blog/massively-scale-deep-learning-training-nccl-2-4/)
* across nodes (N larger than the scale-up domain of G devices): ring reduce-scatter inside the node, the
  chosen algorithm across the ceil(N/G) nodes on each device's 1/G shard over its own NIC, ring all-gather
  inside the node.

Overlap with the backward pass: under DP with flat clipping the clip factor of an example needs the norm of its
WHOLE gradient, so no layer's clipped sum exists before the backward pass has ended: the all-reduce is fully
exposed. Without DP, buckets are all-reduced while the backward pass continues: only max(0, T_ar - T_bwd) is
exposed.

>>> round(ring_allreduce_s(1e9, 8, 100e9, 0.0), 4)  # 2 * 7/8 * 1 GB / 100 GB/s
0.0175
>>> round(tree_allreduce_s(1e9, 8, 100e9, 1e-6) * 1e3, 3)  # 20 ms + 2 * 3 * 1 us
20.006
"""

from __future__ import annotations

import math
from typing import Callable

from dpquant_sim.errors import ConfigError


def ring_allreduce_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` devices (seconds)."""
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bw + 2.0 * (n - 1) * lat


def tree_allreduce_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Pipelined double-binary-tree all-reduce of ``nbytes`` over ``n`` devices (seconds)."""
    if n <= 1:
        return 0.0
    return 2.0 * nbytes / bw + 2.0 * math.ceil(math.log2(n)) * lat


ALLREDUCE: dict[str, Callable[[float, int, float, float], float]] = {
    "ring": ring_allreduce_s, "tree": tree_allreduce_s,
}


def check_devices(profile, devices: int) -> None:
    """ConfigError unless ``devices`` data-parallel devices fit the profile's interconnect."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError("devices", devices, "a positive whole number of devices")
    if devices > profile.max_devices:
        why = "it has no interconnect section" if profile.interconnect is None else "its interconnect's largest tier"
        raise ConfigError("devices", devices, f"at most {profile.max_devices} on {profile.name} ({why})")


def allreduce_s(profile, nbytes: float, devices: int, algorithm: str = "ring") -> float:
    """Seconds to all-reduce ``nbytes`` (per device) over ``devices`` devices of ``profile``."""
    if algorithm not in ALLREDUCE:
        raise ConfigError("allreduce", algorithm, tuple(ALLREDUCE))
    check_devices(profile, devices)
    if devices == 1:
        return 0.0
    up = profile.interconnect.scale_up
    bw_up, lat_up = up.bandwidth.si, up.latency.si
    if devices <= up.devices:
        return ALLREDUCE[algorithm](nbytes, devices, bw_up, lat_up)
    out = profile.interconnect.scale_out
    g = up.devices
    nodes = math.ceil(devices / g)
    intra = 2.0 * ((g - 1) / g * nbytes / bw_up + (g - 1) * lat_up)  # reduce-scatter + all-gather in the node
    return intra + ALLREDUCE[algorithm](nbytes / g, nodes, out.bandwidth.si, out.latency.si)


def exposed_allreduce_s(t_allreduce: float, t_backward: float, *, overlap_backward: bool) -> float:
    """The all-reduce time left on the critical path after overlapping it with the backward pass."""
    return max(0.0, t_allreduce - t_backward) if overlap_backward else t_allreduce
