"""applications.common.config: typed dataclass configs from YAML + overrides."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

import mlo
from applications.common.config import ConfigError, config_keys, config_to_dict, load_config, save_config


@dataclass
class Optim:
    lr: float = 0.1
    epochs: int = 3
    nesterov: bool = False
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self):
        if self.epochs < 1:
            raise ConfigError(f"train.epochs: must be >= 1, got {self.epochs}")


@dataclass
class Data:
    name: str = "digits"
    root: Optional[str] = None
    fraction: Optional[float] = None


@dataclass
class Cfg:
    data: Data = field(default_factory=Data)
    train: Optim = field(default_factory=lambda: Optim(epochs=7))
    seed: int = 0


def test_yaml_and_overrides_are_typed_and_merged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  schedule: step\nseed: 5\n")
    cfg = load_config(Cfg, str(path), ["train.lr=0.5", "data.root=/x", "train.milestones=[3, 4]", "train.nesterov=yes"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.train.schedule == "step"
    assert cfg.train.epochs == 7  # the field's own default survives a partial section
    assert cfg.train.milestones == [3, 4]
    assert cfg.train.nesterov is True
    assert cfg.data.root == "/x" and cfg.seed == 5


def test_yaml_quirks_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 2\n")  # PyYAML reads 1e-3 as a string
    cfg = load_config(Cfg, str(path), ["data.name=no", "data.fraction=null", "train.milestones=5,6"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.name == "no"  # a str field keeps the text, not YAML's boolean
    assert cfg.data.fraction is None
    assert cfg.train.milestones == [5, 6]


def test_unknown_keys_fail_with_valid_keys_listed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, str(path), [])
    msg = str(err.value)
    assert "train.lrr" in msg and "lr, epochs" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="unknown key 'model'"):
        load_config(Cfg, None, ["model.C=3"])
    with pytest.raises(ConfigError, match="train.lr.x"):
        load_config(Cfg, None, ["train.lr.x=3"])


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float, got 'abc'$"):
        load_config(Cfg, None, ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int"):
        load_config(Cfg, None, ["train.epochs=1.5"])
    with pytest.raises(ConfigError, match=r"train\.schedule: expected one of"):
        load_config(Cfg, None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match=r"train\.nesterov: expected bool"):
        load_config(Cfg, None, ["train.nesterov=maybe"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Cfg, None, ["train.lr"])


def test_validate_hooks_run_on_nested_sections():
    with pytest.raises(ConfigError, match="train.epochs: must be >= 1"):
        load_config(Cfg, None, ["train.epochs=0"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, str(tmp_path / "nope.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Cfg, str(bad), [])


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(Cfg, None, ["train.lr=0.25", "data.root=abc", "train.milestones=[9]"])
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(Cfg, str(path), [])
    assert again == cfg
    assert config_to_dict(again)["train"]["milestones"] == [9]


@dataclass
class WithEngine:
    engine: mlo.Engine = mlo.Unrolled(steps=3)
    inner: Data = field(default_factory=Data)
    one_step: Optional[mlo.Unrolled | mlo.FiniteDifference] = None


def test_engine_fields_take_any_field_and_a_new_name_starts_fresh(tmp_path):
    """--set reaches into an engine; its default's fields are kept; changing its name drops the old fields."""
    cfg = load_config(WithEngine, None, ["engine.steps=5"])
    assert cfg.engine == mlo.Unrolled(steps=5)                      # merged with the default engine
    cfg = load_config(WithEngine, None, ["engine.name=cg", "engine.tol=1e-6"])
    assert cfg.engine == mlo.CG(tol=1e-6)                           # 1e-6 is a number, not YAML 1.1's string
    path = tmp_path / "c.yaml"
    path.write_text("engine: {name: finite_difference, eps: 0.1}\n")
    assert load_config(WithEngine, str(path), []).engine == mlo.FiniteDifference(eps=0.1)
    assert load_config(WithEngine, str(path), ["engine.name=cg"]).engine == mlo.CG()
    assert load_config(WithEngine, None, ["engine=neumann"]).engine == mlo.Neumann()
    assert load_config(WithEngine, None, ["engine=neumann", "engine.alpha=0.5"]).engine == mlo.Neumann(alpha=0.5)
    assert load_config(WithEngine, None, ["engine.name=unrolled", "engine.reuse_step_graph=yes",
                                          "engine.steps=1"]).engine == mlo.Unrolled(reuse_step_graph=True)
    with pytest.raises(ConfigError, match="unknown key 'inner.nope'"):
        load_config(WithEngine, None, ["inner.nope=1"])


def test_an_engine_in_a_loaded_config_is_an_engine_and_saves_as_its_mapping(tmp_path):
    cfg = load_config(WithEngine, None, ["engine.name=cg", "engine.iterations=4", "one_step=finite_difference"])
    assert isinstance(cfg.engine, mlo.CG) and isinstance(cfg.one_step, mlo.FiniteDifference)
    plain = config_to_dict(cfg)
    assert plain["engine"] == {"name": "cg", "iterations": 4, "damping": 0.0, "tol": None}
    assert plain["one_step"] == {"name": "finite_difference", "eps": 0.01} and plain["inner"]["name"] == "digits"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(WithEngine, str(tmp_path / "saved.yaml"), []) == cfg
    keys = dict(config_keys(WithEngine))
    assert keys["engine.name"] == "unrolled" and keys["engine.steps"] == 3 and keys["one_step"] is None


@pytest.mark.parametrize("engine", [mlo.ENGINES[n]() for n in mlo.ENGINES] + [
    mlo.Unrolled(steps=4), mlo.Unrolled(reuse_step_graph=True), mlo.FiniteDifference(eps=0.05),
    mlo.Neumann(iterations=3, alpha=None), mlo.CG(iterations=7, damping=0.1, tol=1e-8),
    mlo.MINRES(iterations=9, damping=0.5, tol=1e-7), mlo.DenseImplicit(damping=0.2, max_params=100)])
def test_every_engine_kind_round_trips_through_a_saved_config(tmp_path, engine):
    cfg = WithEngine(engine=engine)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(WithEngine, str(tmp_path / "config.yaml"), [])
    assert again == cfg and type(again.engine) is type(engine)


def test_an_engine_is_parsed_once_per_setting(monkeypatch):
    import applications.common.config as config_module
    calls = []
    real = config_module._engine_from_config
    monkeypatch.setattr(config_module, "_engine_from_config", lambda *a, **k: calls.append(a) or real(*a, **k))
    load_config(WithEngine, None, ["engine.name=cg", "engine.iterations=3", "engine.tol=1e-5",
                                          "one_step=finite_difference", "one_step.eps=0.2"])
    assert len(calls) == 2                        # engine and one_step, each once, whatever the number of keys
    calls.clear()
    load_config(WithEngine, None, [])
    assert calls == []                            # defaults are engines already: nothing to parse


@pytest.mark.parametrize("overrides, field", [
    (["engine.name=cg", "engine.iterations=0"], "engine.iterations"),
    (["engine.name=cg", "engine.iterations=ten"], "engine.iterations"),
    (["engine.name=cgg"], "engine.name"),
    (["engine.tolerance=3"], "engine.tolerance"),
    (["engine.steps=0", "engine.reuse_step_graph=true"], "engine.steps"),
    (["one_step=cg"], "one_step.name"),
    (["inner.fraction=abc"], "inner.fraction"),
    (["inner.nope=1"], "inner.nope"),
])
def test_a_bad_engine_field_is_named_by_the_error_attribute(overrides, field):
    with pytest.raises(mlo.ConfigError) as err:
        load_config(WithEngine, None, overrides)
    assert err.value.field == field
    assert str(err.value).startswith(field) or f"'{field}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_folder_as_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(Cfg, str(tmp_path), [])


def test_config_keys_lists_every_leaf_with_its_default():
    keys = dict(config_keys(Cfg))
    assert keys["train.epochs"] == 7 and keys["data.root"] is None and keys["seed"] == 0
    assert len(keys) == len(Data.__dataclass_fields__) + len(Optim.__dataclass_fields__) + 1


@pytest.mark.parametrize("overrides, field", [
    (["engines.audience.name=unrolled", "engines.audience.reuse_step_graph=false", "engines.audience.steps=2"],
     "engines.audience.steps"),                                   # LeaSE's own check: one step per iteration
    (["engines.explainer.name=cg", "engines.explainer.iterations=0"], "engines.explainer.iterations"),
    (["space.C=0"], "space.C"),
    (["bf16=true", "dtype=float64"], "bf16"),
])
def test_the_search_configs_checks_name_the_field_as_an_attribute(overrides, field):
    from applications.lease.config import SearchConfig
    with pytest.raises(mlo.ConfigError) as err:
        load_config(SearchConfig, None, overrides)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
