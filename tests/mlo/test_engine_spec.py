"""The one engine specification: names and mappings to engines and back, with one-line errors."""
import dataclasses

import pytest

import mlo
from mlo.engines import from_config, to_config


@pytest.mark.parametrize("name", list(mlo.ENGINES))
def test_name_gives_the_engines_own_defaults_and_round_trips(name):
    engine = mlo.engine_from_config(name)
    assert engine == mlo.ENGINES[name]()
    config = mlo.engine_to_config(engine)
    assert config["name"] == name
    assert set(config) == {"name"} | {f.name for f in dataclasses.fields(mlo.ENGINES[name])}
    assert mlo.engine_from_config(config) == engine


@pytest.mark.parametrize("engine", [mlo.Unrolled(steps=3), mlo.FiniteDifference(eps=0.05), mlo.FirstOrder(),
                                    mlo.Neumann(iterations=4, alpha=0.2), mlo.CG(iterations=7, damping=0.1, tol=1e-8),
                                    mlo.MINRES(iterations=9, damping=0.5, tol=1e-7),
                                    mlo.DenseImplicit(damping=0.2, max_params=100)])
def test_every_field_round_trips(engine):
    assert from_config(to_config(engine)) == engine
    assert mlo.engine_from_config(engine) is engine        # an engine passes through unchanged


def test_an_implicit_engine_with_a_function_solver_is_code_not_configuration():
    engine = mlo.Implicit(solver=mlo.solvers.minres)
    assert mlo.engine_from_config(engine) is engine
    with pytest.raises(mlo.ConfigError, match="Implicit has no configuration name"):
        to_config(engine)


def test_cg_tol_is_settable_and_ints_are_accepted_for_floats():
    e = mlo.engine_from_config({"name": "cg", "iterations": 20, "tol": 1e-6, "damping": 1})
    assert e == mlo.CG(iterations=20, damping=1.0, tol=1e-6)
    assert isinstance(e.damping, float)
    assert mlo.engine_from_config({"name": "neumann", "alpha": None}).alpha is None


def test_unknown_engine_lists_the_valid_names():
    with pytest.raises(mlo.ConfigError) as e:
        mlo.engine_from_config({"name": "cgg"}, where="engines.audience")
    msg = str(e.value)
    assert msg.startswith("engines.audience.name: unknown engine 'cgg'")
    assert all(n in msg for n in mlo.ENGINES) and "\n" not in msg


def test_unknown_field_lists_that_engines_fields():
    with pytest.raises(mlo.ConfigError) as e:
        mlo.engine_from_config({"name": "cg", "tolerance": 1e-3})
    assert str(e.value) == "engine.tolerance: unknown field of engine 'cg'; valid fields: iterations, damping, tol"


@pytest.mark.parametrize("spec, where", [
    ({"name": "cg", "iterations": "ten"}, "x.iterations: expected an integer"),
    ({"name": "cg", "iterations": 2.5}, "x.iterations: expected an integer"),
    ({"name": "cg", "iterations": True}, "x.iterations: expected an integer"),
    ({"name": "cg", "damping": None}, "x.damping: expected a number, got None"),
    ({"name": "finite_difference", "eps": "small"}, "x.eps: expected a number"),
    ({"name": "cg", "iterations": 0}, "x.iterations: expected an integer >= 1, got 0"),
    ({"name": "finite_difference", "eps": -1}, "x.eps: expected a finite number > 0"),
    ({"name": "finite_difference", "eps": float("inf")}, "x.eps: expected a finite number > 0"),
    ({"iterations": 3}, "x.name: missing; choose one of"),
    (["cg"], "x: expected an engine name or a mapping"),
])
def test_wrong_types_and_values_name_the_key_on_one_line(spec, where):
    with pytest.raises(mlo.ConfigError) as e:
        mlo.engine_from_config(spec, where="x")
    assert str(e.value).startswith(where), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, field", [
    ({"name": "cgg"}, "x.name"),
    ({"iterations": 3}, "x.name"),
    ({"name": "cg", "tolerance": 1e-3}, "x.tolerance"),
    ({"name": "cg", "iterations": "ten"}, "x.iterations"),
    ({"name": "cg", "iterations": 0}, "x.iterations"),                    # the engine's own check
    ({"name": "cg", "iterations": 3, "tol": -1.0}, "x.tol"),
    ({"name": "unrolled", "steps": 0, "reuse_step_graph": True}, "x.steps"),   # the field the engine refuses
    (["cg"], "x"),
])
def test_the_error_names_the_setting_in_its_field_attribute(spec, field):
    with pytest.raises(mlo.ConfigError) as e:
        mlo.engine_from_config(spec, where="x")
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_choices_restrict_the_names():
    choices = {"unrolled": mlo.Unrolled, "finite_difference": mlo.FiniteDifference}
    assert mlo.engine_from_config("unrolled", choices=choices) == mlo.Unrolled()
    with pytest.raises(mlo.ConfigError) as e:
        mlo.engine_from_config({"name": "cg"}, where="w", choices=choices)
    assert e.value.field == "w.name"
    assert str(e.value) == "w.name: unknown engine 'cg'; choose one of unrolled, finite_difference"
