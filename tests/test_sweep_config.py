"""SweepConfig: grid expansion, stable ids, de-duplication and clear errors naming the key."""

from __future__ import annotations

import pytest

from dpquant_sim.errors import ConfigError
from dpquant_sim.sweep.config import SweepConfig, point_id

BASE = {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64}


def test_grid_expansion_counts_and_budget_only_on_budgeted_kinds():
    cfg = SweepConfig.from_dict(
        {
            "base": BASE,
            "grid": {
                "schedule": [{"kind": "fp32"}, {"kind": "static-all"}, {"kind": "random"},
                             {"kind": "dpquant", "beta": [50.0, 100.0]}],
                "budget": [0.5, 0.75],
                "recipe": ["fp8", "fp4"],
                "seed": [0, 1, 2],
            },
        }
    )
    pts = cfg.points()
    kinds = [p.config.schedule.kind for p in pts]
    # fp32: recipe irrelevant -> 3 seeds; static-all: 2 recipes x 3 seeds; random: 2 budgets x 2 x 3;
    # dpquant: 2 betas x 2 budgets x 2 recipes x 3 seeds.
    assert kinds.count("fp32") == 3
    assert kinds.count("static-all") == 6
    assert kinds.count("random") == 12
    assert kinds.count("dpquant") == 24
    assert len({p.id for p in pts}) == len(pts)
    assert {p.config.schedule.budget for p in pts if p.config.schedule.kind == "random"} == {0.5, 0.75}
    assert {p.config.schedule.beta for p in pts if p.config.schedule.kind == "dpquant"} == {50.0, 100.0}


def test_ids_are_stable_and_content_addressed():
    raw = {"base": BASE, "grid": {"seed": [0, 1]}}
    a = [p.id for p in SweepConfig.from_dict(raw).points()]
    b = [p.id for p in SweepConfig.from_dict(raw).points()]
    assert a == b and len(set(a)) == 2
    # Same resolved config written differently (seed in base vs grid) -> same id.
    c = SweepConfig.from_dict({"base": {**BASE, "seed": 1}}).points()[0].id
    assert c == a[1]
    # The id is a hash of the resolved TrainConfig: 12 hex digits.
    from dpquant_sim.training.config import TrainConfig

    assert point_id(TrainConfig.parse({**BASE, "seed": 1})) == c and len(c) == 12
    int(c, 16)


def test_yaml_roundtrip(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        "name: t\nbase: {dataset: digits, model: mlp, epochs: 1}\n"
        "grid:\n  schedule: [{kind: fp32}, {kind: random}]\n  budget: [0.5]\n"
        "accelerators: [h100_sxm, b200]\nexecutor: {kind: local, workers: 2}\n"
    )
    cfg = SweepConfig.from_yaml(p)
    assert cfg.executor.workers == 2 and cfg.profile_names() == ["h100_sxm", "b200"]
    again = SweepConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert [x.id for x in again.points()] == [x.id for x in cfg.points()]


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"grid": {"seed": 3}}, "grid.seed"),
        ({"grid": {"seeds": [1]}}, "grid.seeds"),
        ({"grid": {"seed": []}}, "grid"),
        ({"base": {"epochs": 0}}, "epochs"),
        ({"base": {"epoch": 2}}, "base.epoch"),
        ({"grid": {"schedule": [{"kind": "bogus"}]}}, "schedule"),
        ({"grid": {"schedule": [{"kind": "random", "budget": [2.0]}]}}, "schedule.budget"),
        ({"accelerators": ["h999"]}, "accelerators"),
        ({"executor": {"kind": "slurm"}}, "executor.kind"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        SweepConfig.from_dict(raw)
    assert str(e.value).split(": ")[-1].startswith(key) or f"{key}=" in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("grid: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        SweepConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="existing YAML file"):
        SweepConfig.from_yaml(tmp_path / "missing.yaml")


def test_example_sweeps_parse():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "analysis" / "sweeps").glob("*.yaml"))
    assert files, "analysis/sweeps/*.yaml examples are missing"
    for f in files:
        assert SweepConfig.from_yaml(f).points(), f
