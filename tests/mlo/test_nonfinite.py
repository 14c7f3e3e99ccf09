"""NaN/Inf detection: which problem, which edge, which step; the skip policy."""
import pytest
import torch

import mlo


class NaNBackward(torch.autograd.Function):
    """Identity forward; NaN gradient. Harmless unless something differentiates through it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def build(inner_nan_at=None, edge_nan=False, outer_inf=False, engine=None):
    """inner (w, reads outer), outer (θ, reads inner)."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    th = torch.tensor([0.5, 0.3], requires_grad=True)

    def inner_obj(ctx, batch):
        t = ctx["outer"]
        if edge_nan:  # only the mixed derivative ∂_θ∇_w g sees this
            t = NaNBackward.apply(t)
        loss = ((ctx["inner"] - t) ** 2).sum()
        if inner_nan_at is not None and ctx.step == inner_nan_at:
            loss = loss * float("nan")
        return loss

    def outer_obj(ctx, batch):
        loss = (ctx["inner"] ** 2).sum() + 0.1 * (ctx["outer"] ** 2).sum()
        return loss * float("inf") if outer_inf else loss

    inner = mlo.Problem("inner", w, inner_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"],
                        engine=engine)
    outer = mlo.Problem("outer", th, outer_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
    return mlo.Graph([inner, outer]), w, th


def test_nan_objective_names_the_problem_and_step():
    graph, w, th = build(inner_nan_at=1)
    st = mlo.Stepper(graph)
    st.step()
    w1, th1 = w.detach().clone(), th.detach().clone()
    with pytest.raises(mlo.NonFiniteError) as e:
        st.step()
    err = e.value
    assert err.problem == "inner" and err.edge is None and err.step == 1
    assert "'inner'" in str(err) and "objective" in str(err)
    assert torch.equal(w, w1) and torch.equal(th, th1)  # nothing was updated


def test_inf_in_outer_objective():
    graph, w, th = build(outer_inf=True)
    with pytest.raises(mlo.NonFiniteError) as e:
        mlo.Stepper(graph).step()
    assert e.value.problem == "outer" and e.value.step == 0


@pytest.mark.parametrize("engine", [mlo.Unrolled(), mlo.FiniteDifference(), mlo.CG(iterations=2),
                                    mlo.Neumann(iterations=2)], ids=lambda e: type(e).__name__)
def test_nan_only_in_an_edge_vjp_names_the_edge(engine):
    graph, w, th = build(edge_nan=True, engine=engine)
    th0 = th.detach().clone()
    with pytest.raises(mlo.NonFiniteError) as e:
        mlo.Stepper(graph).step()
    err = e.value
    assert err.problem == "outer" and err.edge == "inner->outer" and err.step == 0
    assert "inner->outer" in str(err) and "'outer'" in str(err)
    assert torch.equal(th, th0)
    # the inner step itself was finite and did run
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_nan_in_edge_vjp_is_invisible_to_first_order():
    graph, w, th = build(edge_nan=True, engine=mlo.FirstOrder())
    mlo.Stepper(graph).step()
    assert torch.isfinite(th).all()


def test_skip_policy_skips_and_counts():
    graph, w, th = build(edge_nan=True)
    st = mlo.Stepper(graph, nan_policy="skip")
    th0 = th.detach().clone()
    for _ in range(3):
        st.step()
    assert st.skipped["outer"] == 3 and st.skipped.get("inner", 0) == 0
    assert torch.equal(th, th0)          # outer never moved
    assert torch.isfinite(w).all()       # inner kept training
    # skipped counts survive a checkpoint round trip through the Runner
    runner = mlo.Runner(graph, stepper=st, progress=False)
    assert runner.state_dict()["skipped"] == {"outer": 3}


def test_skip_policy_on_objective_nan():
    graph, w, th = build(inner_nan_at=0)
    st = mlo.Stepper(graph, nan_policy="skip")
    w0 = w.detach().clone()
    st.step()
    assert st.skipped["inner"] == 1 and torch.equal(w, w0)
    st.step()  # step 1 is finite
    assert st.skipped["inner"] == 1 and not torch.equal(w, w0)


def test_off_policy_does_not_check():
    graph, w, th = build(edge_nan=True)
    mlo.Stepper(graph, nan_policy="off").step()
    assert torch.isnan(th).all()


@pytest.mark.parametrize("engine", [mlo.Unrolled(), mlo.FiniteDifference(), mlo.CG(iterations=2),
                                    mlo.Neumann(iterations=2)], ids=lambda e: type(e).__name__)
def test_zero_adjoint_gives_zero_not_nan(engine):
    """An upper objective that ignores the lower solution sends u = 0 (FD must guard ε = eps/‖v‖)."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    th = torch.tensor([0.5, 0.3], requires_grad=True)
    inner = mlo.Problem("inner", w, lambda c, b: ((c["inner"] - c["outer"]) ** 2).sum(),
                        lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"], engine=engine)
    outer = mlo.Problem("outer", th, lambda c, b: 0.0 * c["inner"].sum() + (c["outer"] ** 2).sum(),
                        lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
    out = mlo.hypergradient(mlo.Graph([inner, outer]), "outer")
    assert torch.equal(out["hyper"], torch.zeros(2))
    assert torch.equal(out["total"], 2 * th.detach())
