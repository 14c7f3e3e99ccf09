"""Malformed search configs fail before any training with one line naming the field (hypothesis).

Each example sets one field (or one inconsistent pair) to a bad value on the command line and runs
``applications.lease.search.main`` in this process with ``Runner.run`` replaced by a tripwire:
the program must return 2, print exactly one line ``error: ...`` naming the field, create no
output folder and never reach training (no traceback from inside torch or anywhere else).
"""
import contextlib
import io
import math
import os
import string
import tempfile
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlo
from applications.lease import search

EDGES = ("explainer", "explanation", "audience")
BOOL_WORDS = {"true", "yes", "on", "1", "false", "no", "off", "0", "null", "none", "~", ""}

words = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=8)
not_an_int = st.one_of(words, st.sampled_from(["1.5", "[1, 2]", "{a: 1}", "1e3", "nan", "inf"]))
non_positive = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf]))
negative = st.one_of(st.floats(max_value=-1e-300, allow_nan=False), st.sampled_from([math.nan, math.inf]))

# field -> smallest valid integer
INT_FIELDS = {"epochs": 1, "space.C": 1, "space.layers": 1, "space.nodes": 1, "space.stem_multiplier": 1,
              "space.pc_k": 1, "data.batch_size": 1, "data.num_workers": 0, "data.seed": 0, "seed": 0,
              "explain.pgd_steps": 1, "log_every": 1, "checkpoint_every": 1, "max_steps_per_epoch": 1,
              "pdarts.epochs": 1}
POSITIVE_FIELDS = ["weights.lr", "audience_optim.lr", "arch.lr", "explain.lr", "explain.pgd_step_size",
                   "explain.pgd_eps", "audience.width", "weights.grad_clip", "audience_optim.grad_clip"] \
    + [f"engines.{e}.eps" for e in EDGES] + [f"engines.{e}.alpha" for e in EDGES]
NONNEGATIVE_FIELDS = ["gamma", "weights.momentum", "weights.weight_decay", "weights.lr_min",
                      "audience_optim.momentum", "audience_optim.weight_decay", "arch.weight_decay",
                      "explain.init_scale"] + [f"engines.{e}.damping" for e in EDGES]
LITERAL_FIELDS = {"mode": ("lease", "baseline"), "space.name": ("darts", "pcdarts", "pdarts"),
                  "space.stem": ("cifar", "imagenet"), "data.name": ("digits", "synthetic", "cifar10", "cifar100", "imagenet"),
                  "device": ("auto", "cpu", "cuda"), "dtype": ("float32", "float64"),
                  "explain.method": ("ascent", "pgd"), "explain.reweight": ("mul", "mul_abs", "mul_one_plus_abs"),
                  "audience.name": ("resnet18", "resnet50"), "nan_policy": ("raise", "skip", "off"),
                  "explainer_val_order": ("first", "second")}
LITERAL_FIELDS.update({f"engines.{e}.name": tuple(mlo.ENGINES) for e in EDGES})
BOOL_FIELDS = ["bf16", "audience_only", "data.augment", "data.download"]


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _case(field, value, *more):
    """(the --set overrides, the name the message must contain)."""
    return [f"{field}={_fmt(value)}", *more], field


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["int", "int_type", "positive", "nonnegative", "range", "literal", "bool",
                                 "root", "inconsistent"]))
    if kind == "int":
        field = draw(st.sampled_from(sorted(INT_FIELDS)))
        return _case(field, draw(st.integers(max_value=INT_FIELDS[field] - 1, min_value=-10 ** 12)))
    if kind == "int_type":
        return _case(draw(st.sampled_from(sorted(INT_FIELDS))), draw(not_an_int))
    if kind == "positive":
        return _case(draw(st.sampled_from(POSITIVE_FIELDS)), draw(st.one_of(non_positive, words.filter(
            lambda w: w.lower() not in ("inf", "infinity", "nan", "null", "none")))))
    if kind == "nonnegative":
        return _case(draw(st.sampled_from(NONNEGATIVE_FIELDS)), draw(negative))
    if kind == "range":
        field = draw(st.sampled_from(["arch.beta1", "arch.beta2", "data.subset_fraction"]))
        if field == "data.subset_fraction":
            value = draw(st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0000001),
                                   st.just(math.nan)))
        else:
            value = draw(st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-300, allow_nan=False),
                                   st.just(math.nan)))
        return _case(field, value)
    if kind == "literal":
        field = draw(st.sampled_from(sorted(LITERAL_FIELDS)))
        return _case(field, draw(words.filter(lambda w: w not in LITERAL_FIELDS[field] and w.lower() != "null")))
    if kind == "bool":
        return _case(draw(st.sampled_from(BOOL_FIELDS)), draw(words.filter(lambda w: w.lower() not in BOOL_WORDS)))
    if kind == "root":         # a dataset whose folder is not there
        name = draw(st.sampled_from(["cifar10", "cifar100", "imagenet"]))
        missing = os.path.join(tempfile.gettempdir(), "no-such-data-" + draw(words))
        return [f"data.name={name}", f"data.root={missing}"], "data.root"
    # fields that are fine alone but impossible together
    epochs = draw(st.integers(1, 5))
    edge = draw(st.sampled_from(EDGES))
    return draw(st.sampled_from([
        ([f"epochs={epochs}", f"arch_start_epoch={epochs + draw(st.integers(0, 3))}"], "arch_start_epoch"),
        (["space.name=pcdarts", "space.C=6", "space.pc_k=4"], "space.pc_k"),
        (["bf16=true", "dtype=float64"], "bf16"),
        (["mode=baseline", "audience_only=true"], "audience_only"),
        ([f"engines.{edge}.name=cg", f"engines.{edge}.iterations=0"], f"engines.{edge}.iterations"),
        ([f"engines.{edge}.name=unrolled", f"engines.{edge}.reuse_step_graph=false",
          f"engines.{edge}.steps={draw(st.integers(2, 9))}"], f"engines.{edge}.steps"),
        ([f"engines.{edge}.name=unrolled", f"engines.{edge}.reuse_step_graph=true",       # the presets' setting
          f"engines.{edge}.steps={draw(st.integers(2, 9))}"], f"engines.{edge}.steps"),
        (["pdarts.ops_kept=[8, 5]"], "pdarts.ops_kept"),
        (["pdarts.dropout=[0.1, 1.5, 0.2]"], "pdarts.dropout"),
    ]))


def _tripwire(*args, **kwargs):
    raise AssertionError("training started with a malformed config")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_malformed_config_fails_before_training_with_one_line_naming_the_field(case):
    overrides, field = case
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        args = [a for o in overrides for a in ("--set", o)] + ["--out", out, "--device", "cpu"]
        err = io.StringIO()
        with mock.patch.object(search, "tune_cpu", dict), mock.patch.object(mlo.Runner, "run", _tripwire), \
                mock.patch.object(mlo.distributed.DistributedRunner, "run", _tripwire), \
                contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = search.main(args)
        text = err.getvalue()
        assert rc == 2, (overrides, text)
        assert text.startswith("error: ") and text.count("\n") == 1, (overrides, text)
        assert field in text, (overrides, field, text)
        assert "Traceback" not in text
        assert not os.path.exists(out), overrides


def test_too_many_processes_for_the_data_is_an_error_before_training(tmp_path):
    from applications.common import ConfigError, load_config
    from applications.common.run_folder import Run
    from applications.lease.config import SearchConfig
    cfg = load_config(SearchConfig, None, ["data.subset_fraction=0.05"])
    env = mlo.distributed.Env(rank=0, world_size=100_000, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match="cannot split .* over 100000 processes"):
        search.run_search(Run(search.PROGRAM, cfg, str(tmp_path / "x"), torch.device("cpu")), env=env)
    assert not (tmp_path / "x").exists()
