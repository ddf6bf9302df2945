"""Tile families of matrix engines (a registry): the output tiles a GEMM kernel is cut into and the K depth.

Torch- and numpy-free, so validating a profile's ``kernel.tiles`` costs nothing at start-up; the kernel model
that uses them is :mod:`dpquant_sim.cost.gemm`.

>>> get_tile_family("tpu-mxu-128").tiles
((128, 128),)
"""

from __future__ import annotations

from dataclasses import dataclass

from dpquant_sim.errors import ConfigError


@dataclass(frozen=True)
class TileFamily:
    """Candidate output tiles (tm, tn) and the K instruction depth ``tk`` of one kind of matrix engine."""

    name: str
    tiles: tuple[tuple[int, int], ...]
    tk: int
    source: str
    note: str = ""


TILE_FAMILIES: dict[str, TileFamily] = {}


def register_tile_family(fam: TileFamily) -> TileFamily:
    """Add a tile family (profiles name it in ``kernel.tiles``)."""
    TILE_FAMILIES[fam.name] = fam
    return fam


register_tile_family(TileFamily(
    "nvidia-tensor-core", ((128, 256), (256, 128), (128, 128), (128, 64), (64, 128), (64, 64)), tk=64,
    source="https://github.com/NVIDIA/cutlass/blob/main/media/docs/cpp/efficient_gemm.md",
    note="CUTLASS/cuBLAS threadblock tiles of Ampere/Hopper/Blackwell tensor-core GEMMs"))
register_tile_family(TileFamily(
    "nvidia-simt", ((128, 128), (128, 64), (64, 128), (64, 64)), tk=8,
    source="https://github.com/NVIDIA/cutlass/blob/main/media/docs/cpp/efficient_gemm.md",
    note="CUDA-core (non-tensor) SGEMM threadblock tiles"))
register_tile_family(TileFamily(
    "amd-mfma", ((256, 256), (256, 128), (128, 256), (128, 128), (128, 64), (64, 128)), tk=64,
    source="https://rocm.docs.amd.com/projects/hipBLASLt/en/latest/",
    note="hipBLASLt macro tiles on CDNA matrix cores (typical sizes; not a vendor table)"))
register_tile_family(TileFamily(
    "tpu-mxu-128", ((128, 128),), tk=128,
    source="https://docs.cloud.google.com/tpu/docs/system-architecture-tpu-vm",
    note="128x128 systolic MXU: K and N are padded to multiples of 128"))
register_tile_family(TileFamily(
    "tpu-mxu-256", ((256, 256),), tk=256,
    source="https://docs.cloud.google.com/tpu/docs/v6e",
    note="256x256 systolic MXU (Trillium and later)"))
register_tile_family(TileFamily(
    "gaudi-mme", ((256, 256), (256, 128), (128, 256)), tk=128,
    source="https://www.sgpjbg.com/baogao/465025.html",
    note="Gaudi 3 MME: a configurable 256x256 MAC array (Hot Chips 2024 deck, Intel)"))


def get_tile_family(name: str) -> TileFamily:
    if name not in TILE_FAMILIES:
        raise ConfigError("kernel.tiles", name, tuple(TILE_FAMILIES))
    return TILE_FAMILIES[name]


