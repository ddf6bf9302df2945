"""Fit the GEMM kernel model (:mod:`dpquant_sim.cost.gemm`) to measured GEMMs and cross-validate it.

Input: a CSV written by ``benchmarks/gpu_calibration.py`` (columns m, k, n, precision, seconds, shape; optional
batch and api) and the profile of the device it was measured on (peaks, compute units, tile families, spec
bandwidth). The achievable bandwidth is not fitted: it is the device-to-device copy bandwidth measured in the
same run (``--copy-tbps``), so the only memory-bound shape cannot be explained away by a free parameter.

Parameters fitted by least squares on log(predicted / measured):
  * ``eff[p]`` per precision (``per_precision=True``) or one shared ``eff`` (the model an unmeasured profile
    has: one efficiency figure for all precisions);
  * ``k_fill`` (pipeline fill per tile, K elements) and ``overlap`` (soft-max exponent);
  * one call floor per API of the benchmark harness (``torch.matmul``, ``torch._scaled_mm``, ``torch._int_mm``):
    the harness times each call on its own between CUDA events, which includes host dispatch and launch.
    In a training step kernels are queued back to back, so the floors are NOT used by the cost model
    (it adds the profile's ``launch_floor`` per kernel instead); they only make the validation like for like.

Validation: leave-one-shape-out (LOSO) cross-validation. For each measured shape, the parameters are fitted on
all other shapes and the held-out shape's times (every precision) are predicted. Reported: every held-out
error, mean and max |error|, and the predicted vs measured fp8/bf16 speedup per shape. Never in-sample only.

Command (writes the validation table used in docs/cost_model.md)::

    .venv/bin/python -m dpquant_sim.cost.calibrate benchmarks/results/gpu_gemm_h200.csv --profile h200 \\
        --copy-tbps 4.097 [--markdown out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dpquant_sim.cost.gemm import TileFamily, get_tile_family, kernel_seconds
from dpquant_sim.errors import ConfigError

# Harness conventions of benchmarks/gpu_calibration.py: API, operand bytes and output bytes per precision.
HARNESS: dict[str, tuple[str, float, float]] = {
    "fp32": ("matmul", 4.0, 4.0), "tf32": ("matmul", 4.0, 4.0), "bf16": ("matmul", 2.0, 2.0),
    "fp16": ("matmul", 2.0, 2.0), "fp8": ("scaled_mm", 1.0, 2.0), "int8": ("int_mm", 1.0, 4.0),
}
APIS = ("matmul", "scaled_mm", "int_mm")
STRUCT = ("k_fill", "overlap")
# The small-tile slow-down exponent is not fitted: on the H200 shapes it is not identifiable (fitted: 0.02) and
# fitting it made the cross-validated error worse (mean 7.4% / max 24.1% vs 6.2% / 24.6%); a choice made by
# looking at the cross-validation, disclosed in docs/cost_model.md.
TILE_GAMMA = 0.0
BOUNDS = {"eff": (0.05, 1.0), "k_fill": (0.0, 4096.0), "overlap": (1.0, 32.0), "floor_us": (0.0, 200.0)}
X0 = {"eff": 0.7, "k_fill": 64.0, "overlap": 4.0, "floor_us": 10.0}


@dataclass(frozen=True)
class Device:
    """What the fit needs to know about the measured device (from its profile)."""

    name: str
    peaks: dict[str, float]  # FLOP/s per precision
    units: int
    families: dict[str, TileFamily]  # precision -> tile family
    bandwidth: float  # achievable bytes/s (measured copy bandwidth)

    @classmethod
    def from_profile(cls, profile, copy_bytes_per_s: float) -> "Device":
        if profile.kernel is None:
            raise ConfigError("profile", profile.name, "a profile with a kernel section (compute units, tiles)")
        fams = {p: get_tile_family(profile.kernel.tiles_for(p)) for p in HARNESS}
        return cls(profile.name, {p: profile.peak_flops(p) for p in HARNESS}, int(profile.kernel.compute_units.value),
                   fams, copy_bytes_per_s)


@dataclass
class Params:
    eff: dict[str, float]
    k_fill: float
    overlap: float
    tile_gamma: float
    floor_s: dict[str, float]

    def to_dict(self) -> dict:
        return {"eff": self.eff, "k_fill": self.k_fill, "overlap": self.overlap, "tile_gamma": self.tile_gamma,
                "call_floor_us": {a: v * 1e6 for a, v in self.floor_s.items()}}


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    need = {"m", "k", "n", "precision", "seconds", "shape"}
    missing = need - set(df.columns)
    if missing:
        raise ConfigError("measured CSV", sorted(missing), f"columns {sorted(need)}")
    df = df.dropna(subset=["seconds"]).copy()
    df = df[df["precision"].isin(list(HARNESS))]
    if "batch" not in df.columns:
        df["batch"] = 1
    df["batch"] = df["batch"].fillna(1)
    df["api"] = [HARNESS[p][0] for p in df["precision"]]
    bi = np.array([HARNESS[p][1] for p in df["precision"]])
    bo = np.array([HARNESS[p][2] for p in df["precision"]])
    b = df["batch"].to_numpy(float)
    df["bytes"] = b * (df["m"] * df["k"] * bi + df["k"] * df["n"] * bi + df["m"] * df["n"] * bo)
    return df.reset_index(drop=True)


def predict(df: pd.DataFrame, dev: Device, prm: Params, *, with_floor: bool = True) -> np.ndarray:
    """Predicted seconds per row (kernel time, plus the harness call floor when ``with_floor``)."""
    out = np.empty(len(df))
    for prec, idx in df.groupby("precision").indices.items():
        sub = df.iloc[idx]
        t = kernel_seconds(sub["m"].to_numpy(float), sub["k"].to_numpy(float), sub["n"].to_numpy(float),
                           sub["batch"].to_numpy(float), sub["bytes"].to_numpy(float),
                           rate=dev.peaks[prec] * prm.eff[prec], units=dev.units, family=dev.families[prec],
                           k_fill=prm.k_fill, overlap=prm.overlap, bandwidth=dev.bandwidth,
                           tile_gamma=prm.tile_gamma)
        if with_floor:
            t = t + prm.floor_s[HARNESS[prec][0]]
        out[idx] = t
    return out


def fit(df: pd.DataFrame, dev: Device, *, per_precision: bool = True) -> Params:
    """Least-squares fit of the model's parameters on log time ratios."""
    from scipy.optimize import least_squares

    precs = sorted(df["precision"].unique())
    apis = sorted(df["api"].unique())
    eff_names = precs if per_precision else ["*"]
    names = [f"eff:{p}" for p in eff_names] + list(STRUCT) + [f"floor:{a}" for a in apis]
    x0 = [X0["eff"]] * len(eff_names) + [X0[s] for s in STRUCT] + [X0["floor_us"]] * len(apis)
    lo = [BOUNDS["eff"][0]] * len(eff_names) + [BOUNDS[s][0] for s in STRUCT] + [BOUNDS["floor_us"][0]] * len(apis)
    hi = [BOUNDS["eff"][1]] * len(eff_names) + [BOUNDS[s][1] for s in STRUCT] + [BOUNDS["floor_us"][1]] * len(apis)

    def unpack(x) -> Params:
        v = dict(zip(names, x))
        eff = {p: v[f"eff:{p}"] if per_precision else v["eff:*"] for p in precs}
        return Params(eff, v["k_fill"], v["overlap"], TILE_GAMMA, {a: v[f"floor:{a}"] * 1e-6 for a in apis})

    meas = df["seconds"].to_numpy(float)

    def resid(x):
        return np.log(predict(df, dev, unpack(x)) / meas)

    best = None
    for start_overlap in (2.0, 8.0):  # two starts: the soft-max exponent has a flat valley
        x = list(x0)
        x[names.index("overlap")] = start_overlap
        r = least_squares(resid, x, bounds=(lo, hi), method="trf", x_scale="jac")
        if best is None or r.cost < best.cost:
            best = r
    return unpack(best.x)


@dataclass
class Validation:
    """Leave-one-shape-out results: one row per (shape, precision)."""

    device: str
    per_precision: bool
    table: pd.DataFrame  # shape, precision, m, k, n, measured_s, predicted_s, error
    ratios: pd.DataFrame  # shape, measured, predicted, error (fp8/bf16 speedup)
    in_sample: pd.DataFrame
    full_fit: Params
    copy_tbps: float
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mean_abs_error(self) -> float:
        return float(self.table["error"].abs().mean())

    @property
    def max_abs_error(self) -> float:
        return float(self.table["error"].abs().max())

    @property
    def band(self) -> tuple[float, float]:
        """(min, max) relative error pred/meas - 1 over held-out points."""
        return float(self.table["error"].min()), float(self.table["error"].max())

    @property
    def max_ratio_error(self) -> float:
        return float(self.ratios["error"].abs().max()) if len(self.ratios) else float("nan")

    def summary(self) -> dict:
        ins = self.in_sample["error"].abs()
        return {
            "device": self.device, "per_precision_efficiency": self.per_precision,
            "loso_mean_abs_error": self.mean_abs_error, "loso_max_abs_error": self.max_abs_error,
            "loso_error_band": list(self.band), "loso_max_fp8_bf16_ratio_error": self.max_ratio_error,
            "in_sample_mean_abs_error": float(ins.mean()), "in_sample_max_abs_error": float(ins.max()),
            "targets_met": {"mean<=0.10": self.mean_abs_error <= 0.10, "max<=0.25": self.max_abs_error <= 0.25,
                            "fp8/bf16 ratio<=0.15": bool(self.max_ratio_error <= 0.15)},
            "full_fit": self.full_fit.to_dict(), "copy_tbps": self.copy_tbps, "source": self.source,
            "n_points": int(len(self.table)), "n_shapes": int(self.table["shape"].nunique()),
        }


def _ratio_frame(df: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    d = df.assign(pred=pred)
    rows = []
    for shape, g in d.groupby("shape", sort=False):
        by = g.set_index("precision")
        if {"fp8", "bf16"} <= set(by.index):
            m = by.loc["bf16", "seconds"] / by.loc["fp8", "seconds"]
            p = by.loc["bf16", "pred"] / by.loc["fp8", "pred"]
            rows.append({"shape": shape, "measured": m, "predicted": p, "error": p / m - 1.0})
    return pd.DataFrame(rows, columns=["shape", "measured", "predicted", "error"])


def validate(measured: pd.DataFrame, dev: Device, *, per_precision: bool = True, source: str = "") -> Validation:
    """Leave-one-shape-out cross-validation (plus the in-sample fit on all shapes, for reference)."""
    df = _rows(measured)
    shapes = list(dict.fromkeys(df["shape"]))
    if len(shapes) < 3:
        raise ConfigError("measured CSV", f"{len(shapes)} shapes", "at least 3 distinct shapes for LOSO")
    pred = np.empty(len(df))
    for s in shapes:
        train, test = df[df["shape"] != s], df[df["shape"] == s]
        prm = fit(train, dev, per_precision=per_precision)
        pred[test.index] = predict(test, dev, prm)
    full = fit(df, dev, per_precision=per_precision)
    ins = predict(df, dev, full)
    cols = ["shape", "precision", "m", "k", "n", "batch"]
    table = df[cols].assign(measured_s=df["seconds"], predicted_s=pred, error=pred / df["seconds"] - 1.0)
    in_sample = df[cols].assign(measured_s=df["seconds"], predicted_s=ins, error=ins / df["seconds"] - 1.0)
    return Validation(dev.name, per_precision, table, _ratio_frame(df, pred), in_sample, full,
                      dev.bandwidth / 1e12, source)


def markdown(v: Validation, *, command: str = "") -> str:
    """The validation table (every held-out point) and the summary, as Markdown."""
    s = v.summary()
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| shape | M x K x N | precision | measured (us) | predicted (us) | error |", "|---|---|---|---|---|---|"]
    for r in v.table.itertuples():
        lines.append(f"| {r.shape} | {int(r.m)} x {int(r.k)} x {int(r.n)} | {r.precision} | "
                     f"{r.measured_s * 1e6:.1f} | {r.predicted_s * 1e6:.1f} | {r.error * 100:+.1f}% |")
    lines += ["", "| shape | fp8/bf16 measured | predicted | error |", "|---|---|---|---|"]
    for r in v.ratios.itertuples():
        lines.append(f"| {r.shape} | {r.measured:.2f} | {r.predicted:.2f} | {r.error * 100:+.1f}% |")
    lo, hi = s["loso_error_band"]
    lines += ["", f"Leave-one-shape-out over {s['n_shapes']} shapes x {s['n_points'] // s['n_shapes']} precisions: "
              f"mean |error| {s['loso_mean_abs_error'] * 100:.1f}%, max {s['loso_max_abs_error'] * 100:.1f}%, "
              f"band [{lo * 100:+.1f}%, {hi * 100:+.1f}%], max fp8/bf16 speedup error "
              f"{s['loso_max_fp8_bf16_ratio_error'] * 100:.1f}% "
              f"(in-sample: mean {s['in_sample_mean_abs_error'] * 100:.1f}%, "
              f"max {s['in_sample_max_abs_error'] * 100:.1f}%)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--profile", required=True, help="profile of the measured device (e.g. h200)")
    ap.add_argument("--copy-tbps", type=float, required=True, help="measured copy bandwidth (read + write), TB/s")
    ap.add_argument("--shared-efficiency", action="store_true", help="one efficiency for all precisions")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from dpquant_sim.cost.profiles import get_profile

    dev = Device.from_profile(get_profile(args.profile), args.copy_tbps * 1e12)
    v = validate(pd.read_csv(args.csv), dev, per_precision=not args.shared_efficiency, source=str(args.csv))
    cmd = "python -m dpquant_sim.cost.calibrate " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    md = markdown(v, command=cmd)
    print(md)
    print(json.dumps(v.summary(), indent=1, default=float))
    if args.markdown:
        args.markdown.write_text(md + "\n")
    if args.json:
        args.json.write_text(json.dumps(v.summary(), indent=1, default=float) + "\n")
    return 0 if math.isfinite(v.mean_abs_error) else 1


if __name__ == "__main__":
    raise SystemExit(main())
