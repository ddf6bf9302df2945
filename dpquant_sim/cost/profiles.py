"""Accelerator profiles: a validated, typed view of ``hw_profiles/*.yaml``.

Every figure carries its source URL; a precision without a native path says which precision actually runs
(``{supported: false, fallback: bf16}``). Profiles are validated on load; any problem raises ONE
:class:`~dpquant_sim.errors.ProfileError` naming the file, the key and what is allowed.

Units: peaks in TFLOP/s (float precisions) or TOP/s (integer precisions); bandwidth TB/s or GB/s; capacity
GB or GiB; on-chip memory MB or MiB; TDP in W; launch floor in us; price in USD/h. The accessors on
:class:`HardwareProfile` return SI values (FLOP/s, bytes/s, bytes, W, s).

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
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

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


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Peak(_Model):
    """Dense peak of one precision. ``dense: false`` = derived from a vendor figure with 2:4 sparsity."""

    value: float = Field(gt=0)
    unit: Literal["TFLOP/s", "TOP/s"]
    dense: bool
    source: str = Field(min_length=4)
    note: str = ""
    uncertain: bool = False
    slower_than_fallback: bool = False  # declared: the vendor really rates this narrower format below a wider one

    supported: Literal[True] = True

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


class _Quantity(_Model):
    value: float = Field(gt=0)
    source: str = Field(min_length=4)
    note: str = ""
    uncertain: bool = False

    @property
    def si(self) -> float:
        return self.value * _UNIT_SCALE[self.unit]  # type: ignore[attr-defined]


class _OptionalQuantity(_Model):
    """A figure that may be unpublished: ``value: null`` with a note saying so."""

    value: float | None = Field(gt=0)
    source: str = Field(min_length=4)
    note: str = ""
    uncertain: bool = False

    @property
    def si(self) -> float | None:
        return None if self.value is None else self.value * _UNIT_SCALE[self.unit]  # type: ignore[attr-defined]


class VectorRate(_OptionalQuantity):
    """Non-tensor (CUDA-core / vector unit) rate for elementwise ops; null = model them as memory-bound."""

    unit: Literal["TFLOP/s"]
    dense: bool = True


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


class Fraction(_Model):
    value: float = Field(gt=0, le=1)
    source: str = Field(min_length=4)
    note: str = ""
    uncertain: bool = False


class Efficiency(_Model):
    gemm: Fraction  # achievable share of the peak FLOP rate on large GEMMs
    bandwidth: Fraction  # achievable share of the spec memory bandwidth


class LaunchFloor(_Quantity):
    unit: Literal["us"]


class Price(_Quantity):
    unit: Literal["USD/h"]


class PowerMode(_Model):
    name: str
    tdp_w: float = Field(gt=0)
    gpu_int8_sparse_tops: float | None = Field(default=None, gt=0)
    dla_int8_sparse_tops: float | None = Field(default=None, gt=0)
    source: str = Field(min_length=4)


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
    power_modes: tuple[PowerMode, ...] = ()
    notes: str = ""

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
                       ("launch_floor", self.launch_floor)):
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
        return str(ctx.get("error", err["msg"]))
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


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
    return prof


def load_profile_file(path: str | Path) -> HardwareProfile:
    """Read and validate one YAML profile file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
