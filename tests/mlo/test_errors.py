"""Bad graphs and bad configs raise clear errors that name what is wrong."""
import pytest
import torch

import mlo


def obj_for(name, reads):
    def objective(ctx, batch):
        out = (ctx[name] ** 2).sum()
        for r in reads:
            out = out + (ctx[name] * ctx[r]).sum()
        return out
    return objective


def mk(name, reads=(), optimizer=None, **kw):
    w = torch.randn(2, requires_grad=True)
    return mlo.Problem(name, w, kw.pop("objective", obj_for(name, reads)),
                       optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)), reads=list(reads), **kw)


# ---------------------------------------------------------------- graphs
def test_unknown_read_suggests_a_name():
    with pytest.raises(mlo.GraphError) as e:
        mlo.Graph([mk("inner", ["outr"]), mk("outer", ["inner"])])
    msg = str(e.value)
    assert "'outr'" in msg and "'inner'" in msg and "did you mean 'outer'" in msg


def test_unknown_read_without_close_match_lists_known_problems():
    with pytest.raises(mlo.GraphError, match="known problems: inner, outer"):
        mlo.Graph([mk("inner", ["zzzzzz"]), mk("outer", ["inner"])])


def test_duplicate_names():
    with pytest.raises(mlo.GraphError, match="duplicate.*'a'"):
        mlo.Graph([mk("a", ["b"]), mk("b", ["a"]), mk("a", ["b"])])


def test_self_read():
    with pytest.raises(mlo.GraphError, match="'a' reads itself"):
        mlo.Graph([mk("a", ["a", "b"]), mk("b", ["a"])])


def test_order_missing_a_problem():
    with pytest.raises(mlo.GraphError) as e:
        mlo.Graph([mk("a", ["b"]), mk("b", ["a"]), mk("c", ["a"])], order=["a", "c"])
    assert "every problem exactly once" in str(e.value) and "'b'" in str(e.value)


def test_order_duplicate_and_unknown():
    with pytest.raises(mlo.GraphError, match="exactly once"):
        mlo.Graph([mk("a", ["b"]), mk("b", ["a"])], order=["a", "b", "a"])
    with pytest.raises(mlo.GraphError, match="did you mean 'b'"):
        mlo.Graph([mk("a", ["b"]), mk("b", ["a"])], order=["a", "bb"])


def test_problem_nobody_reads():
    with pytest.raises(mlo.GraphError) as e:
        mlo.Graph([mk("a", ["b"]), mk("b", ["a"]), mk("lonely", ["a"])])
    assert "'lonely'" in str(e.value) and "read by no" in str(e.value)


def test_single_problem_graph_is_fine():
    g = mlo.Graph([mk("only")])
    mlo.Stepper(g).step()


def test_edge_engines_for_a_name_not_read():
    with pytest.raises(mlo.GraphError, match="edge_engines names 'c'"):
        mlo.Graph([mk("a", ["b"], edge_engines={"c": mlo.CG()}), mk("b", ["a"])])


def test_engine_must_be_an_engine_config():
    with pytest.raises(mlo.GraphError, match="a->b"):
        mlo.Graph([mk("a", ["b"], engine="cg"), mk("b", ["a"])])


def test_unrolled_steps_cannot_be_scheduled():
    with pytest.raises(mlo.GraphError) as e:
        mlo.Graph([mk("inner", ["outer"], engine=mlo.Unrolled(steps=3), steps=1), mk("outer", ["inner"])])
    msg = str(e.value)
    assert "cannot be scheduled" in msg and "'inner'" in msg and "inner->outer" in msg
    # enough steps: fine
    mlo.Graph([mk("inner", ["outer"], engine=mlo.Unrolled(steps=3), steps=3), mk("outer", ["inner"])])


@pytest.mark.parametrize("engine", [mlo.Unrolled(), mlo.FiniteDifference()], ids=["Unrolled", "FD"])
def test_unsupported_optimizer(engine):
    rms = lambda p: torch.optim.RMSprop(p, lr=0.01)  # noqa: E731
    with pytest.raises(mlo.ConfigError) as e:
        mlo.Graph([mk("inner", ["outer"], optimizer=rms, engine=engine), mk("outer", ["inner"])])
    assert "RMSprop" in str(e.value) and "'inner'" in str(e.value)


@pytest.mark.parametrize("engine", [mlo.CG(), mlo.Neumann(), mlo.FirstOrder()], ids=["CG", "Neumann", "FO"])
def test_unsupported_optimizer_is_fine_for_implicit_engines(engine):
    rms = lambda p: torch.optim.RMSprop(p, lr=0.01)  # noqa: E731
    g = mlo.Graph([mk("inner", ["outer"], optimizer=rms, engine=engine), mk("outer", ["inner"])])
    mlo.Stepper(g).step()


# ---------------------------------------------------------------- engine fields
@pytest.mark.parametrize("make,field", [
    (lambda: mlo.CG(iterations=0), "CG.iterations"),
    (lambda: mlo.CG(iterations=2.5), "CG.iterations"),
    (lambda: mlo.CG(damping=-1.0), "CG.damping"),
    (lambda: mlo.CG(tol=0.0), "CG.tol"),
    (lambda: mlo.Neumann(alpha=-1), "Neumann.alpha"),
    (lambda: mlo.Neumann(alpha=float("nan")), "Neumann.alpha"),
    (lambda: mlo.Neumann(iterations=-1), "Neumann.iterations"),
    (lambda: mlo.FiniteDifference(eps=0), "FiniteDifference.eps"),
    (lambda: mlo.Unrolled(steps=0), "Unrolled.steps"),
    (lambda: mlo.Unrolled(steps=True), "Unrolled.steps"),
])
def test_engine_field_validation(make, field):
    with pytest.raises(mlo.ConfigError, match=field.replace(".", r"\.")):
        make()


def test_engine_from_config_unknown_name_and_field():
    assert mlo.engine_from_config({"name": "cg", "iterations": 4}) == mlo.CG(iterations=4)
    with pytest.raises(mlo.ConfigError, match="unknown engine 'cgg'"):
        mlo.engine_from_config("cgg")
    with pytest.raises(mlo.ConfigError, match="valid fields"):
        mlo.engine_from_config({"name": "neumann", "iters": 3})


# ---------------------------------------------------------------- problems
def test_problem_mode():
    with pytest.raises(mlo.ConfigError, match="mode.*'maximize'") as e:
        mk("p", mode="maximize")
    assert "'p'" in str(e.value)


@pytest.mark.parametrize("steps", [0, -1, 1.0, True])
def test_problem_steps(steps):
    with pytest.raises(mlo.ConfigError, match="'p': steps"):
        mk("p", steps=steps)


def test_non_leaf_params():
    base = torch.randn(3, requires_grad=True)
    with pytest.raises(mlo.ConfigError, match="leaf") as e:
        mlo.Problem("p", {"w": base * 2}, lambda c, b: c["p"]["w"].sum(), lambda p: torch.optim.SGD(p, lr=0.1))
    assert "'p'" in str(e.value) and "'w'" in str(e.value)


def test_integer_params_and_empty_params():
    with pytest.raises(mlo.ConfigError, match="floating point"):
        mlo.Problem("p", torch.zeros(3, dtype=torch.long), lambda c, b: 0, lambda p: None)
    with pytest.raises(mlo.ConfigError, match="no parameters"):
        mlo.Problem("p", {}, lambda c, b: 0, lambda p: None)


def test_optimizer_over_other_params():
    w = torch.zeros(2, requires_grad=True)
    other = torch.zeros(2, requires_grad=True)
    with pytest.raises(mlo.ConfigError, match="exactly this problem's parameters"):
        mlo.Problem("p", w, lambda c, b: c["p"].sum(), torch.optim.SGD([other], lr=0.1))
    with pytest.raises(mlo.ConfigError, match="not an Optimizer"):
        mlo.Problem("p", w, lambda c, b: c["p"].sum(), lambda p: "sgd")


def test_grad_clip_validation():
    with pytest.raises(mlo.ConfigError, match="grad_clip"):
        mk("p", grad_clip=0.0)


def test_objective_reads_a_problem_not_in_reads():
    def sneaky(ctx, batch):
        return (ctx["a"] ** 2).sum() + (ctx["c"] ** 2).sum()  # "c" is not in a's reads

    a = mk("a", ["b"], objective=sneaky)
    g = mlo.Graph([a, mk("b", ["a", "c"]), mk("c", ["b"])])
    with pytest.raises(mlo.GraphError) as e:
        mlo.Stepper(g).step()
    msg = str(e.value)
    assert "'a'" in msg and "'c'" in msg and "reads" in msg


def test_objective_must_return_a_scalar():
    g = mlo.Graph([mk("a", objective=lambda c, b: c["a"] * 2)])
    with pytest.raises(TypeError, match=r"'a'.*scalar tensor, got Tensor of shape \(\d+,\)"):
        mlo.Stepper(g).step()


def test_nan_policy_validation():
    g = mlo.Graph([mk("a")])
    with pytest.raises(ValueError, match="nan_policy"):
        mlo.Stepper(g, nan_policy="ignore")
