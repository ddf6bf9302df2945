"""`--preset paper`: one word sets the DPQuant paper's method; anything the user names explicitly wins.

Expectations are the paper's elements as docs/fidelity.md lists them, written out here, not read from
dpquant_sim.presets.
"""

from __future__ import annotations

import pytest

from dpquant_sim.errors import ConfigError
from dpquant_sim.sweep.config import SweepConfig
from dpquant_sim.training.config import TrainConfig


def test_paper_preset_sets_the_papers_method():
    cfg = TrainConfig.parse({"preset": "paper"})
    assert cfg.recipe == "luq_fp4"
    s = cfg.schedule
    assert s.kind == "dpquant"
    assert (s.sampler, s.budget_unit, s.estimator, s.interval) == ("paper", "layers", "training", 2)
    assert cfg.preset == "paper"


def test_explicit_fields_win_over_the_preset():
    cfg = TrainConfig.parse({"preset": "paper", "recipe": "fp8",
                             "schedule": {"kind": "dpquant", "estimator": "forward", "interval": 3}})
    assert cfg.recipe == "fp8"
    assert (cfg.schedule.estimator, cfg.schedule.interval, cfg.schedule.sampler) == ("forward", 3, "paper")
    cfg = TrainConfig.parse({"preset": "paper", "schedule": {"kind": "random", "budget_unit": "flops"}})
    assert cfg.schedule.budget_unit == "flops"


def test_baselines_under_the_preset():
    static = TrainConfig.parse({"preset": "paper", "schedule": {"kind": "static-subset", "budget": 0.75}}).schedule
    assert (static.select, static.budget_unit, static.budget) == ("random", "layers", 0.75)
    rnd = TrainConfig.parse({"preset": "paper", "schedule": {"kind": "random"}}).schedule
    assert rnd.budget_unit == "layers"
    fp32 = TrainConfig.parse({"preset": "paper", "schedule": {"kind": "fp32"}})
    assert fp32.schedule.kind == "fp32" and fp32.recipe == "luq_fp4"


def test_no_preset_keeps_the_defaults():
    cfg = TrainConfig.parse({})
    assert cfg.preset is None and cfg.schedule.kind == "fp32"


def test_unknown_preset_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        TrainConfig.parse({"preset": "papr"})
    assert "preset" in str(e.value) and "paper" in str(e.value)


def test_cli_build_config_applies_the_preset_under_flags(tmp_path):
    from dpquant_sim.cli.train_cmd import build_config

    cfg = build_config(None, {"preset": "paper"}, {"budget": 0.9}, {}, {})
    assert cfg.schedule.kind == "dpquant" and cfg.schedule.budget == 0.9 and cfg.recipe == "luq_fp4"
    cfg = build_config(None, {"preset": "paper", "_schedule": "static-subset"}, {}, {}, {})
    assert cfg.schedule.select == "random"
    # A YAML file that names a recipe keeps it; the preset fills the rest.
    y = tmp_path / "c.yaml"
    y.write_text("recipe: fp4\nepochs: 2\n")
    cfg = build_config(y, {"preset": "paper"}, {}, {}, {})
    assert (cfg.recipe, cfg.epochs, cfg.schedule.kind, cfg.schedule.estimator) == ("fp4", 2, "dpquant", "training")


def test_sweep_preset_reaches_every_point():
    sw = SweepConfig.from_dict({
        "preset": "paper",
        "base": {"epochs": 1},
        "grid": {"schedule": [{"kind": "dpquant"}, {"kind": "static-subset"}, {"kind": "random"}],
                 "budget": [0.5, 0.9]},
        "accelerators": ["h100_sxm"],
    })
    cfgs = [p.config for p in sw.points()]
    assert len(cfgs) == 6
    for c in cfgs:
        assert c.recipe == "luq_fp4" and c.preset == "paper"
        assert c.schedule.budget_unit == "layers"
    assert {c.schedule.select for c in cfgs if c.schedule.kind == "static-subset"} == {"random"}
    assert {c.schedule.estimator for c in cfgs if c.schedule.kind == "dpquant"} == {"training"}


def test_recipe_names_mirror_the_registry():
    from dpquant_sim.nn.config import RECIPES
    from dpquant_sim.recipe_names import RECIPE_NAMES

    assert RECIPE_NAMES == tuple(RECIPES)
