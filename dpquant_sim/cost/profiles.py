"""Accelerator profiles: a validated, typed view of ``hw_profiles/*.yaml``.

Every figure carries its source URL; a precision without a native path says which precision actually runs
(``{supported: false, fallback: bf16}``). Profiles are validated on load; any problem raises ONE
:class:`~dpquant_sim.errors.ProfileError` naming the file, the key and what is allowed.

Units: peaks in TFLOP/s (float precisions) or TOP/s (integer precisions); bandwidth TB/s or GB/s; capacity
GB or GiB; on-chip memory MB or MiB; TDP in W; launch floor and link latency in us; price in USD/h. The
accessors on :class:`HardwareProfile` return SI values (FLOP/s, bytes/s, bytes, W, s).

Every figure says where it comes from (``provenance``): ``vendor`` (a vendor datasheet, whitepaper, product or
documentation page; ``page`` names the page or table), ``vendor_copy`` (a vendor table reproduced verbatim by a
third party, the original out of reach), ``third_party``, ``derived`` (computed from other figures; the note
says how), ``measured``, ``fit`` (fitted to measurements by ``dpquant_sim.cost.calibrate``), ``transferred``
(measured or fitted on another device) or ``assumption``. A peak whose vendor figure includes 2:4 sparsity
records it: ``vendor_value: 1979, vendor_sparse: true`` and ``value: 989.5`` (the dense half); the validator
refuses a sparse figure stored as dense.

>>> p = get_profile("a100_sxm")
>>> p.resolve("fp8"), p.peak_flops("fp8") == p.peak_flops("bf16")
('bf16', True)
>>> get_profile("h100_sxm").resolve("fp4")
'fp8'

A user adds a profile by dropping ``my_chip.yaml`` in a folder and passing it:
``load_profiles(extra_dirs=["my_profiles"])`` or ``dpquant-sim cost ... --hw-dir my_profiles``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, model_validator

from dpquant_sim.errors import ConfigError, ProfileError

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "fp6", "fp4", "int8", "int4")
Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "fp6", "fp4", "int8", "int4"]
INT_PRECISIONS = frozenset({"int8", "int4"})
# The next wider precision of each: a supported precision slower than this one's (resolved) rate is
# suspicious (a framework would just run the wider one) unless declared with slower_than_fallback: true.
WIDER: dict[str, str | None] = {
    "fp32": None, "tf32": "fp32", "bf16": "fp32", "fp16": "fp32",
    "fp8": "bf16", "fp6": "fp8", "fp4": "fp6", "int8": "bf16", "int4": "int8",
}
# Plausibility ranges (SI) that catch unit slips and values off by orders of magnitude.
PEAK_RANGE_TFLOPS = (0.1, 100_000.0)
BANDWIDTH_RANGE_TBS = (0.01, 100.0)
RIDGE_RANGE = (10.0, 5000.0)  # bf16 FLOP per byte of DRAM traffic; every real accelerator sits in here
CAPACITY_RANGE_GB = (0.5, 10_000.0)

_UNIT_SCALE = {
    "TFLOP/s": 1e12, "TOP/s": 1e12, "TB/s": 1e12, "GB/s": 1e9, "GB": 1e9, "GiB": 2**30, "MB": 1e6, "MiB": 2**20,
    "W": 1.0, "us": 1e-6, "USD/h": 1.0,
}
Provenance = Literal["vendor", "vendor_copy", "third_party", "derived", "measured", "fit", "transferred",
                     "assumption"]
VENDOR_PROVENANCE = frozenset({"vendor", "vendor_copy"})
# A narrower precision may run at most this many times faster than its next wider one (2x: half the bits);
# more is declared with faster_than_2x: true (GeForce FP32-accumulate halving, Blackwell Ultra FP4) or is a
# sparse figure stored as dense.
MAX_STEP_RATIO = 2.05
# Precisions whose next wider one runs on different hardware (tensor vs CUDA cores): no ratio rule.
NO_RATIO_RULE = frozenset({"tf32", "bf16", "fp16"})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Sourced(_Model):
    """Where a figure comes from. A vendor figure (``vendor``/``vendor_copy``) must name its page or table."""

    source: str = Field(min_length=4)
    provenance: Provenance
    page: str = ""
    note: str = ""
    uncertain: bool = False

    @model_validator(mode="after")
    def _vendor_page(self):
        if self.provenance in VENDOR_PROVENANCE and not self.page:
            raise ValueError(f"page: required with provenance {self.provenance!r} (the page or table of the source)")
        return self


class Peak(_Sourced):
    """Dense peak of one precision (``value``), with the vendor's own figure when it differs.

    ``vendor_value``: the figure as printed by the vendor; ``vendor_sparse: true`` when it includes 2:4
    structured sparsity (then ``value`` must be half of it). ``page``: page or table in ``source``.
    """

    value: float = Field(gt=0)
    unit: Literal["TFLOP/s", "TOP/s"]
    vendor_value: float | None = Field(default=None, gt=0)
    vendor_sparse: bool = False
    slower_than_fallback: bool = False  # declared: the vendor really rates this narrower format below a wider one
    faster_than_2x: bool = False  # declared: more than 2x the next wider precision (see MAX_STEP_RATIO)

    supported: Literal[True] = True

    @model_validator(mode="before")
    @classmethod
    def _renamed_dense(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dense" in data:
            raise ValueError("dense: this key was renamed (it read as if the value were sparse); record the vendor's "
                             "figure instead: vendor_value: <as printed>, vendor_sparse: true|false, and value: the "
                             "dense figure (half of a sparse one)")
        return data

    @model_validator(mode="after")
    def _sparse_consistent(self) -> "Peak":
        if self.vendor_sparse and self.vendor_value is None:
            raise ValueError("vendor_sparse: true needs vendor_value (the sparse figure as printed)")
        if self.vendor_value is not None:
            want = self.vendor_value / 2 if self.vendor_sparse else self.vendor_value
            if abs(self.value - want) > 0.01 * want:
                if self.vendor_sparse and abs(self.value - self.vendor_value) <= 0.01 * self.vendor_value:
                    raise ValueError(f"value {self.value:g} equals the sparse vendor figure {self.vendor_value:g}: a "
                                     f"sparse figure stored as dense; expected value {want:g} (vendor_value / 2)")
                raise ValueError(f"value {self.value:g} does not match vendor_value {self.vendor_value:g} "
                                 f"(vendor_sparse: {str(self.vendor_sparse).lower()}); expected {want:g}")
        return self

    @property
    def ops_per_s(self) -> float:
        return self.value * _UNIT_SCALE[self.unit]


class Unsupported(_Model):
    """No native path: data of this precision runs as ``fallback``."""

    supported: Literal[False]
    fallback: Precision
    note: str = ""
    uncertain: bool = False  # the absence of a native path (or its rate) is itself uncertain


def _peak_tag(v: Any) -> str:
    if isinstance(v, dict):
        return "unsupported" if v.get("supported") is False else "peak"
    return "unsupported" if getattr(v, "supported", True) is False else "peak"


PeakEntry = Annotated[
    Union[Annotated[Peak, Tag("peak")], Annotated[Unsupported, Tag("unsupported")]], Discriminator(_peak_tag)
]


class Peaks(_Model):
    fp32: PeakEntry
    tf32: PeakEntry
    bf16: PeakEntry
    fp16: PeakEntry
    fp8: PeakEntry
    fp6: PeakEntry
    fp4: PeakEntry
    int8: PeakEntry
    int4: PeakEntry


class _Quantity(_Sourced):
    value: float = Field(gt=0)

    @property
    def si(self) -> float:
        return self.value * _UNIT_SCALE[self.unit]  # type: ignore[attr-defined]


class _OptionalQuantity(_Sourced):
    """A figure that may be unpublished: ``value: null`` with a note saying so."""

    value: float | None = Field(gt=0)

    @property
    def si(self) -> float | None:
        return None if self.value is None else self.value * _UNIT_SCALE[self.unit]  # type: ignore[attr-defined]


class VectorRate(_OptionalQuantity):
    """Non-tensor (CUDA-core / vector unit) rate for elementwise ops; null = model them as memory-bound."""

    unit: Literal["TFLOP/s"]


class Bandwidth(_Quantity):
    unit: Literal["TB/s", "GB/s"]


class Capacity(_Quantity):
    unit: Literal["GB", "GiB"]


class Memory(_Model):
    bandwidth: Bandwidth
    capacity: Capacity  # usable, not physical


class OnChip(_OptionalQuantity):
    unit: Literal["MB", "MiB"]


class Power(_OptionalQuantity):
    unit: Literal["W"]


class Fraction(_Sourced):
    value: float = Field(gt=0, le=1)


class Efficiency(_Model):
    gemm: Fraction  # achievable share of the peak FLOP rate on large GEMMs
    bandwidth: Fraction  # achievable share of the spec memory bandwidth


class LaunchFloor(_Quantity):
    unit: Literal["us"]


class Price(_Quantity):
    """Public on-demand price of one device for one hour (a cloud instance's price / its devices)."""

    unit: Literal["USD/h"]
    as_of: str = Field(pattern=r"^\d{4}-\d{2}(-\d{2})?$")  # when the price applied, per its source (prices change)
    offer: str = Field(min_length=3)  # instance type, region, and how the per-device figure was derived


class Count(_Sourced):
    value: int = Field(gt=0)


class Scalar(_Sourced):
    value: float = Field(ge=0)


class ErrorBand(_Model):
    """Relative error of predicted GEMM times (predicted / measured - 1), from cross-validation."""

    low: float = Field(le=0)
    high: float = Field(ge=0)
    basis: Literal["measured", "transferred", "generic"]
    source: str = Field(min_length=4)
    note: str = ""


class MeasuredGemms(_Sourced):
    """Measured GEMM times that override the kernel model for exactly these (M, K, N, batch, precision).

    ``file``: CSV next to the profile (columns m, k, n, precision, seconds; optional batch, api and
    seconds_queued = per call with calls queued back to back). Single-call ``seconds`` include the harness's
    call floor, which is subtracted (``call_floor_us`` per API, fitted with the kernel model).
    """

    file: str
    call_floor_us: dict[str, float]


class Kernel(_Model):
    """What the GEMM kernel model (dpquant_sim.cost.gemm) needs: compute units, tile families, and the
    parameters fitted on measurements (absent: efficiency.gemm for every precision and the generic fit)."""

    compute_units: Count  # SMs / CUs / MXUs / MMEs working on output tiles in parallel
    tiles: str  # tile family of the matrix engine (dpquant_sim.cost.gemm.TILE_FAMILIES)
    fp32_tiles: str | None = None  # family of fp32 GEMMs when they run elsewhere (CUDA cores); default: tiles
    efficiency: dict[Precision, Fraction] = Field(default_factory=dict)
    k_fill: Scalar | None = None
    overlap: Scalar | None = None
    error_band: ErrorBand | None = None
    measured: MeasuredGemms | None = None

    @model_validator(mode="after")
    def _families_known(self) -> "Kernel":
        from dpquant_sim.cost.tiles import TILE_FAMILIES

        for key in ("tiles", "fp32_tiles"):
            v = getattr(self, key)
            if v is not None and v not in TILE_FAMILIES:
                raise ValueError(f"kernel.{key}: {v!r} is not allowed; expected one of {sorted(TILE_FAMILIES)}")
        return self

    def tiles_for(self, prec: str) -> str:
        return self.fp32_tiles if (prec == "fp32" and self.fp32_tiles) else self.tiles


class Latency(_Quantity):
    unit: Literal["us"]


class Link(_Model):
    """One tier of the interconnect: per-device bandwidth in each direction and a per-step latency."""

    name: str
    devices: int = Field(ge=1)  # devices reachable at this tier (scale-up domain size; scale-out: max job size)
    bandwidth: Bandwidth  # per device, per direction
    latency: Latency


class Interconnect(_Model):
    """Scale-up (NVLink, Infinity Fabric, ICI, PCIe) and optional scale-out (NIC) tiers for data parallelism."""

    scale_up: Link
    scale_out: Link | None = None

    @property
    def max_devices(self) -> int:
        return max(self.scale_up.devices, self.scale_out.devices if self.scale_out else 1)


class PowerMode(_Sourced):
    name: str
    tdp_w: float = Field(gt=0)
    gpu_int8_sparse_tops: float | None = Field(default=None, gt=0)
    dla_int8_sparse_tops: float | None = Field(default=None, gt=0)


class HardwareProfile(_Model):
    """One accelerator. See the module docstring for units; SI accessors below."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    display_name: str
    vendor: str
    kind: Literal["gpu", "tpu", "npu", "soc", "cpu", "other"]
    architecture: str = ""
    peaks: Peaks
    vector: VectorRate
    memory: Memory
    onchip: OnChip
    tdp: Power
    efficiency: Efficiency
    launch_floor: LaunchFloor
    price_per_hour: Price | None = None
    kernel: Kernel | None = None
    interconnect: Interconnect | None = None
    power_modes: tuple[PowerMode, ...] = ()
    notes: str = ""
    _folder: Path | None = PrivateAttr(default=None)  # where the YAML file was read (for kernel.measured.file)
    _measured: dict | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> "HardwareProfile":
        problems: list[str] = []
        for prec in PRECISIONS:
            e = getattr(self.peaks, prec)
            if isinstance(e, Peak):
                want = "TOP/s" if prec in INT_PRECISIONS else "TFLOP/s"
                if e.unit != want:
                    problems.append(f"peaks.{prec}.unit: {e.unit!r} is not allowed for {prec}; expected {want!r}")
                lo, hi = PEAK_RANGE_TFLOPS
                if not lo <= e.value <= hi:
                    problems.append(f"peaks.{prec}.value: {e.value} {e.unit} is outside the plausible range "
                                    f"[{lo}, {hi}] (unit slip?)")
            else:
                seen = [prec]
                cur = e
                while isinstance(cur, Unsupported):
                    if cur.fallback in seen:
                        problems.append(f"peaks.{prec}.fallback: chain {' -> '.join(seen + [cur.fallback])} is a "
                                        "cycle; expected a chain ending in a supported precision")
                        break
                    seen.append(cur.fallback)
                    cur = getattr(self.peaks, cur.fallback)
        if problems:  # later checks need resolvable rates
            raise ValueError("\n".join(problems))
        for prec in PRECISIONS:
            e = getattr(self.peaks, prec)
            wider = WIDER[prec]
            if isinstance(e, Peak) and wider is not None and not e.slower_than_fallback:
                if e.value < self._resolved_peak(wider).value:
                    problems.append(
                        f"peaks.{prec}.value: {e.value} {e.unit} is slower than {wider} "
                        f"({self._resolved_peak(wider).value} {self._resolved_peak(wider).unit}); a framework would "
                        f"run {wider} instead. Allowed: a value >= that, or declare it with "
                        "'slower_than_fallback: true' and a note citing the vendor")
                if (prec not in NO_RATIO_RULE and not e.faster_than_2x
                        and e.value > MAX_STEP_RATIO * self._resolved_peak(wider).value):
                    problems.append(
                        f"peaks.{prec}.value: {e.value} {e.unit} is {e.value / self._resolved_peak(wider).value:.2g}x "
                        f"{wider} ({self._resolved_peak(wider).value}); narrower formats give at most 2x, so this "
                        "looks like a sparse figure stored as dense. Allowed: the dense figure (vendor_value with "
                        "vendor_sparse: true), or declare 'faster_than_2x: true' with a note citing the vendor")
        bw_tbs = self.memory.bandwidth.si / 1e12
        lo, hi = BANDWIDTH_RANGE_TBS
        if not lo <= bw_tbs <= hi:
            problems.append(f"memory.bandwidth.value: {self.memory.bandwidth.value} {self.memory.bandwidth.unit} = "
                            f"{bw_tbs:g} TB/s is outside the plausible range [{lo}, {hi}] TB/s (unit slip?)")
        else:
            ridge = self._resolved_peak("bf16").ops_per_s / self.memory.bandwidth.si
            if not RIDGE_RANGE[0] <= ridge <= RIDGE_RANGE[1]:
                problems.append(
                    f"memory.bandwidth.value: {self.memory.bandwidth.value} {self.memory.bandwidth.unit} gives a bf16 "
                    f"ridge point of {ridge:.3g} FLOP/byte; expected {RIDGE_RANGE[0]:g}..{RIDGE_RANGE[1]:g} "
                    "(bandwidth or peak off by orders of magnitude?)")
        cap_gb = self.memory.capacity.si / 1e9
        if not CAPACITY_RANGE_GB[0] <= cap_gb <= CAPACITY_RANGE_GB[1]:
            problems.append(f"memory.capacity.value: {cap_gb:g} GB is outside the plausible range {CAPACITY_RANGE_GB}")
        if self.launch_floor.value > 1000:
            problems.append(f"launch_floor.value: {self.launch_floor.value} us; expected at most 1000 us")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ------------------------------------------------------------------ accessors (SI units)
    def _resolved_peak(self, prec: str) -> Peak:
        e = getattr(self.peaks, prec)
        while isinstance(e, Unsupported):
            e = getattr(self.peaks, e.fallback)
        return e

    def resolve(self, prec: str) -> str:
        """The precision that actually runs when ``prec`` is requested (follows fallbacks)."""
        if prec not in PRECISIONS:
            raise ConfigError("precision", prec, PRECISIONS)
        e = getattr(self.peaks, prec)
        while isinstance(e, Unsupported):
            prec = e.fallback
            e = getattr(self.peaks, prec)
        return prec

    def peak_flops(self, prec: str) -> float:
        """Dense peak in FLOP/s (or OP/s) of ``prec`` after fallbacks."""
        return self._resolved_peak(self.resolve(prec)).ops_per_s

    def is_native(self, prec: str) -> bool:
        return isinstance(getattr(self.peaks, prec), Peak)

    def gemm_efficiency(self, prec: str) -> float:
        """Sustained share of the peak on full tiles for GEMMs requested in ``prec`` (after fallbacks):
        the fitted per-precision figure where the profile has one, else ``efficiency.gemm``."""
        run = self.resolve(prec)
        if self.kernel is not None and run in self.kernel.efficiency:
            return self.kernel.efficiency[run].value
        return self.efficiency.gemm.value

    def measured_gemm_s(self, m: float, k: float, n: float, batch: float, prec: str) -> float | None:
        """Measured kernel seconds of this exact GEMM in ``prec`` (after fallbacks), or None."""
        if self.kernel is None or self.kernel.measured is None:
            return None
        if self._measured is None:
            self._measured = _read_measured(self.kernel.measured, self._folder or shipped_dir())
        return self._measured.get((float(m), float(k), float(n), float(batch), self.resolve(prec)))

    @property
    def kernel_constants(self) -> tuple[float, float]:
        """(k_fill, overlap) of the GEMM kernel model: the profile's fit, else the generic fit."""
        from dpquant_sim.cost.gemm import GENERIC

        k = self.kernel
        k_fill = k.k_fill.value if k is not None and k.k_fill is not None else GENERIC.k_fill
        overlap = k.overlap.value if k is not None and k.overlap is not None else GENERIC.overlap
        return k_fill, overlap

    @property
    def error_band(self) -> tuple[float, float, str]:
        """(low, high, basis) relative error of predicted GEMM times; the generic band without a fit."""
        from dpquant_sim.cost.gemm import GENERIC

        if self.kernel is not None and self.kernel.error_band is not None:
            b = self.kernel.error_band
            return b.low, b.high, b.basis
        return GENERIC.band_low, GENERIC.band_high, "generic"

    @property
    def max_devices(self) -> int:
        """Most devices one data-parallel job can use (1 without an interconnect section)."""
        return 1 if self.interconnect is None else self.interconnect.max_devices

    @property
    def vector_flops(self) -> float | None:
        """Non-tensor rate in FLOP/s, or None (elementwise ops then count bytes only)."""
        return self.vector.si

    @property
    def bandwidth(self) -> float:
        """Spec memory bandwidth in bytes/s."""
        return self.memory.bandwidth.si

    @property
    def capacity_bytes(self) -> float:
        return self.memory.capacity.si

    @property
    def tdp_w(self) -> float | None:
        return self.tdp.si

    @property
    def price_usd_per_s(self) -> float | None:
        return None if self.price_per_hour is None else self.price_per_hour.value / 3600.0

    @property
    def launch_s(self) -> float:
        return self.launch_floor.si

    def figures(self) -> list[tuple[str, Any]]:
        """(dotted key, figure) of every sourced figure of the profile (peaks, memory, power, efficiency,
        kernel model, interconnect, price), in a stable order."""
        out: list[tuple[str, Any]] = []

        def walk(obj: Any, key: str) -> None:
            if obj is None:
                return
            if isinstance(obj, BaseModel) and "provenance" in type(obj).model_fields:
                out.append((key, obj))
                return
            if isinstance(obj, BaseModel):
                for name in type(obj).model_fields:
                    walk(getattr(obj, name), f"{key}.{name}" if key else name)
            elif isinstance(obj, dict):
                for k2, v in obj.items():
                    walk(v, f"{key}.{k2}")
            elif isinstance(obj, tuple):
                for i, v in enumerate(obj):
                    walk(v, f"{key}[{i}]")

        walk(self, "")
        return out

    @property
    def uncertain_keys(self) -> list[str]:
        """Dotted keys of every figure flagged uncertain."""
        out = []
        for prec in PRECISIONS:
            e = getattr(self.peaks, prec)
            if e.uncertain:
                out.append(f"peaks.{prec}")
        for key, q in (("vector", self.vector), ("memory.bandwidth", self.memory.bandwidth),
                       ("memory.capacity", self.memory.capacity), ("onchip", self.onchip), ("tdp", self.tdp),
                       ("efficiency.gemm", self.efficiency.gemm), ("efficiency.bandwidth", self.efficiency.bandwidth),
                       ("launch_floor", self.launch_floor), ("price_per_hour", self.price_per_hour)):
            if q is None:
                continue
            if q.uncertain:
                out.append(key)
        return out


# ---------------------------------------------------------------------------------------------- error formatting
def _model_at(loc: tuple, root: type[BaseModel] = HardwareProfile) -> type[BaseModel] | None:
    """The pydantic model class found by walking ``loc`` (field names) from the root; None if not a model."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int) or part in ("peak", "unsupported"):
            if part == "peak":
                cls = Peak
            elif part == "unsupported":
                cls = Unsupported
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        cls = _first_model(ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _first_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        m = _first_model(a)
        if m is not None:
            return m
    return None


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if p not in ("peak", "unsupported") and not isinstance(p, int))
    key = ".".join(str(p) for p in loc) or "<top level>"
    typ, ctx = err["type"], err.get("ctx") or {}
    if typ == "extra_forbidden":
        parent = _model_at(tuple(err["loc"][:-1]))
        allowed = ", ".join(parent.model_fields) if parent else "see the schema"
        return f"{key}: unknown key; allowed keys here: {allowed}"
    if typ == "missing":
        return f"{key}: missing required key"
    if typ == "literal_error":
        return f"{key}: {err.get('input')!r} is not allowed; expected {ctx.get('expected')}"
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values()))
        return f"{key}: {err.get('input')!r} is not allowed; expected a number {op} {bound}"
    if typ == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return msg if (not loc or msg.startswith(key)) else f"{key}: {msg}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _read_measured(meas: MeasuredGemms, folder: Path) -> dict:
    """{(m, k, n, batch, precision): kernel seconds} from a measured CSV (torch-free: the csv module)."""
    import csv

    from dpquant_sim.cost.calibrate import HARNESS

    path = folder / meas.file
    try:
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
    except OSError as e:
        raise ProfileError(f"kernel.measured.file: cannot read {path} ({e.strerror})") from None
    out = {}
    for r in rows:
        if not r.get("seconds") or r.get("precision") not in HARNESS:
            continue
        batch = float(r.get("batch") or 1)
        if r.get("seconds_queued"):
            t = float(r["seconds_queued"])
        else:
            api = r.get("api") or HARNESS[r["precision"]][0]
            t = float(r["seconds"]) - meas.call_floor_us.get(api, 0.0) * 1e-6
        out[(float(r["m"]), float(r["k"]), float(r["n"]), batch, r["precision"])] = max(t, 0.0)
    return out


def parse_profile(data: Any, path: str | Path = "<memory>") -> HardwareProfile:
    """Validate a parsed YAML mapping; raise ProfileError naming ``path``, the key(s) and what is allowed."""
    path = Path(path)
    if not isinstance(data, dict):
        raise ProfileError(f"hardware profile {path}: expected a YAML mapping at the top level, got "
                           f"{type(data).__name__}")
    try:
        prof = HardwareProfile.model_validate(data)
    except ValidationError as e:
        lines = [line for err in e.errors() for line in _format_error(err).split("\n")]
        raise ProfileError(f"hardware profile {path} is invalid:\n  " + "\n  ".join(lines)) from None
    if path.suffix in (".yaml", ".yml") and prof.name != path.stem:
        raise ProfileError(f"hardware profile {path} is invalid:\n  name: {prof.name!r} must equal the file name "
                           f"stem {path.stem!r}")
    if path.suffix in (".yaml", ".yml"):
        prof._folder = path.parent
    return prof


def load_profile_file(path: str | Path) -> HardwareProfile:
    """Read and validate one YAML profile file."""
    path = Path(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~8x faster start-up
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except OSError as e:
        raise ProfileError(f"hardware profile {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"hardware profile {path}: not valid YAML ({e})") from None
    return parse_profile(data, path)


def shipped_dir() -> Path:
    """The folder of shipped profiles (``dpquant_sim.hw_profiles`` package; the repo's hw_profiles/ in a checkout)."""
    try:
        import dpquant_sim.hw_profiles as pkg

        d = Path(next(iter(pkg.__path__)))
        if any(d.glob("*.yaml")):
            return d
    except (ImportError, StopIteration):
        pass
    return Path(__file__).resolve().parents[2] / "hw_profiles"


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[str, HardwareProfile], ...]:
    return tuple((p.name, p) for p in (load_profile_file(f) for f in sorted(shipped_dir().glob("*.yaml"))))


def load_profiles(extra_dirs: Iterable[str | Path] = ()) -> dict[str, HardwareProfile]:
    """Shipped profiles plus every ``*.yaml``/``*.yml`` in ``extra_dirs`` (a user profile may not reuse a name).

    >>> "h100_sxm" in load_profiles()
    True
    """
    out = dict(_shipped())
    origin = {n: "shipped" for n in out}
    for d in extra_dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError("hw_dir", str(d), "an existing folder of *.yaml hardware profiles")
        for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            prof = load_profile_file(f)
            if prof.name in out:
                raise ProfileError(f"hardware profile {f}: name {prof.name!r} is already defined by "
                                   f"{origin[prof.name]}; pick another name (and file name)")
            out[prof.name] = prof
            origin[prof.name] = str(f)
    return out


def get_profile(name: str, extra_dirs: Iterable[str | Path] = ()) -> HardwareProfile:
    """One profile by name; ConfigError listing the known names otherwise."""
    profiles = load_profiles(extra_dirs)
    if name not in profiles:
        raise ConfigError("hw", name, tuple(profiles))
    return profiles[name]
