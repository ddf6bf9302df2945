"""TrainConfig: defaults, YAML round trip, one clear ConfigError per bad value."""

from __future__ import annotations

import pytest

from dpquant_sim.errors import ConfigError
from dpquant_sim.training.config import TrainConfig


def test_defaults_and_yaml_roundtrip(tmp_path):
    c = TrainConfig()
    assert c.private and c.epsilon == 8.0 and c.noise_multiplier is None and c.schedule.kind == "fp32"
    assert TrainConfig(noise_multiplier=1.0).epsilon is None  # a fixed sigma does not get a default cap
    c2 = TrainConfig.parse({"model": "mlp", "schedule": {"kind": "dpquant", "budget": 0.75, "beta": 50.0},
                            "drop": {"keep": 0.5}})
    p = tmp_path / "c.yaml"
    c2.to_yaml(p)
    assert TrainConfig.from_yaml(p) == c2
    assert c2.with_updates(seed=3).seed == 3 and c2.seed == 0
    with pytest.raises(Exception):
        c2.seed = 4  # frozen


@pytest.mark.parametrize("data,needle", [
    ({"epochs": 0}, "epochs=0 is not allowed; expected a value greater than or equal to 1"),
    ({"delta": 1.0}, "delta=1.0 is not allowed; expected a value less than 1"),
    ({"epsilon": -2}, "epsilon=-2 is not allowed; expected a value greater than 0"),
    ({"model": "vgg"}, "model='vgg' is not allowed; expected 'mlp', 'cnn'"),
    ({"recipe": "fp3"}, "recipe='fp3' is not allowed; expected one of 'fp8'"),
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not allowed; expected 'sgd' or 'adam'"),
    ({"dataset": "gtsrb"}, "data_dir=None is not allowed; expected a local folder for dataset 'gtsrb'"),
    ({"noise_multiplier": 0}, "noise_multiplier=0 is not allowed"),
    ({"lr": 0}, "lr=0 is not allowed"),
    ({"batchsize": 3}, "batchsize=3 is not allowed; expected no such field (known: dataset"),
    ({"schedule": {"kind": "random", "budget": 0}}, "schedule.budget=0 is not allowed"),
    ({"schedule": {"kind": "static-all", "budget": 0.5}}, "no such field for schedule kind 'static-all'"),
    ({"schedule": {"kind": "what"}}, "expected kind one of 'fp32'"),
])
def test_one_clear_error(data, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig.parse(data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="readable YAML"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "neg.yaml").write_text("epochs: -1\n")
    with pytest.raises(ConfigError, match=r"neg.yaml: epochs=-1"):
        TrainConfig.from_yaml(tmp_path / "neg.yaml")
