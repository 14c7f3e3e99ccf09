"""A DAG with two paths into one problem; adjoints summed, shared edge once.

order: L (reads T), M1 (reads L), M2 (reads L), T (reads M1, M2)

    L'  = L  − η_L ∇ L_L(L, T)
    M1' = M1 − η_1 ∇ L_1(M1, L')
    M2' = M2 − η_2 ∇ L_2(M2, L')
    O_T = L_T(M1', M2', T)
g_T = ∂_T O + (∂L'/∂T)ᵀ [(∂M1'/∂L')ᵀ ∂O/∂M1' + (∂M2'/∂L')ᵀ ∂O/∂M2']
"""
import torch
import torch.nn.functional as Fn

import mlo

ETA_L, ETA_1, ETA_2, ETA_T = 0.3, 0.2, 0.35, 0.1


def _consts():
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(P=r(3, 2), Q1=r(2, 3), Q2=r(2, 3), c1=r(2), c2=r(2), l0=r(3), m10=r(2), m20=r(2), t0=r(2))


C = _consts()


def L_L(l, t):
    return 0.5 * ((l - torch.tanh(C["P"] @ t)) ** 2).sum() + 0.1 * (Fn.softplus(l) * (1 + t.sum() ** 2)).sum()


def L_1(m, l):
    return 0.5 * ((m - Fn.softplus(C["Q1"] @ l)) ** 2).sum() + 0.05 * torch.tanh(m).sum()


def L_2(m, l):
    return 0.5 * (1 + 0.1 * (l ** 2).sum()) * (m ** 2).sum() - m @ torch.tanh(C["Q2"] @ l)


def O_T(m1, m2, t):
    return 0.5 * ((m1 - C["c1"]) ** 2).sum() + 0.5 * ((torch.tanh(m2) - C["c2"]) ** 2).sum() \
        + 0.05 * (t ** 2).sum() + 0.1 * t @ (m1 * m2)


def grad(f, x, *args):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(f(x, *args), x, create_graph=True)[0]


def by_hand(paths=("M1", "M2")):
    """(direct, hyper) by autograd through the composition; ``paths`` says which
    M-problems see L' as a function of T (the other sees a constant)."""
    t = C["t0"].clone().requires_grad_()
    l1 = C["l0"] - ETA_L * grad(L_L, C["l0"], t)
    m1 = C["m10"] - ETA_1 * grad(L_1, C["m10"], l1 if "M1" in paths else l1.detach())
    m2 = C["m20"] - ETA_2 * grad(L_2, C["m20"], l1 if "M2" in paths else l1.detach())
    total = torch.autograd.grad(O_T(m1, m2, t), t)[0]
    tt = C["t0"].clone().requires_grad_()
    direct = torch.autograd.grad(O_T(m1.detach(), m2.detach(), tt), tt)[0]
    return direct, total - direct


def build(engines=None):
    engines = engines or {}
    sgd = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))  # noqa: E731
    mk = lambda k: C[k].clone().requires_grad_()  # noqa: E731
    pl = mlo.Problem("L", mk("l0"), lambda c, b: L_L(c["L"], c["T"]), sgd(ETA_L), reads=["T"],
                     engine=engines.get("L"))
    p1 = mlo.Problem("M1", mk("m10"), lambda c, b: L_1(c["M1"], c["L"]), sgd(ETA_1), reads=["L"],
                     engine=engines.get("M1"))
    p2 = mlo.Problem("M2", mk("m20"), lambda c, b: L_2(c["M2"], c["L"]), sgd(ETA_2), reads=["L"],
                     engine=engines.get("M2"))
    pt = mlo.Problem("T", mk("t0"), lambda c, b: O_T(c["M1"], c["M2"], c["T"]), sgd(ETA_T), reads=["M1", "M2"])
    return mlo.Graph([pl, p1, p2, pt])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_two_paths_sum():
    direct, hyper = by_hand()
    _, h1 = by_hand(("M1",))
    _, h2 = by_hand(("M2",))
    assert rel(h1 + h2, hyper) < 1e-12  # the paths really add (sanity of the reference)
    assert h1.norm() > 1e-3 and h2.norm() > 1e-3
    out = mlo.hypergradient(build(), "T")
    assert rel(out["direct"], direct) < 1e-12
    assert rel(out["hyper"], hyper) < 1e-10
    # single-path graphs: cut one path with a first-order edge
    only1 = mlo.hypergradient(build({"M2": mlo.FirstOrder()}), "T")["hyper"]
    only2 = mlo.hypergradient(build({"M1": mlo.FirstOrder()}), "T")["hyper"]
    assert rel(only1, h1) < 1e-10
    assert rel(only2, h2) < 1e-10
    assert rel(only1 + only2, out["hyper"]) < 1e-10


def test_shared_edge_vjp_runs_once_per_step():
    graph = build()
    st = mlo.Stepper(graph)
    st.step()
    assert dict(st.vjp_calls) == {"M2->L": 1, "M1->L": 1, "L->T": 1}
    st.step()
    st.step()
    assert dict(st.vjp_calls) == {"M2->L": 3, "M1->L": 3, "L->T": 3}


def test_cut_path_is_not_swept():
    st = mlo.Stepper(build({"M2": mlo.FirstOrder()}))
    st.step()
    assert dict(st.vjp_calls) == {"M1->L": 1, "L->T": 1}
    st = mlo.Stepper(build({"L": mlo.FirstOrder()}))  # no adjoint can reach T: no sweep at all
    st.step()
    assert dict(st.vjp_calls) == {}


# ---- one edge serving two reads: P2 reads P1 (earlier) and T (later) ------------
def test_one_vjp_serves_two_reads():
    """order P1 (reads T), P2 (reads P1, T), T (reads P2):
    g_T = ∂_T O + (∂P2'/∂T)ᵀu + (∂P1'/∂T)ᵀ(∂P2'/∂P1')ᵀu, with u = ∂O/∂P2'."""
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, 2, generator=gen), torch.randn(2, 2, generator=gen)
    p10, p20, t0 = torch.randn(2, generator=gen), torch.randn(2, generator=gen), torch.randn(2, generator=gen)
    g1 = lambda p, t: 0.5 * ((p - torch.tanh(A @ t)) ** 2).sum()  # noqa: E731
    g2 = lambda p, q, t: 0.5 * ((p - Fn.softplus(B @ q) * torch.sigmoid(t)) ** 2).sum()  # noqa: E731
    O = lambda p, t: ((p - 1) ** 2).sum() + (t ** 3).sum() * 0.1  # noqa: E731

    t = t0.clone().requires_grad_()
    p1 = p10 - 0.3 * grad(g1, p10, t)
    p2 = p20 - 0.2 * grad(lambda p, q: g2(p, q, t), p20, p1)
    ref = torch.autograd.grad(O(p2, t), t)[0]

    sgd = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))  # noqa: E731
    P1 = mlo.Problem("P1", p10.clone().requires_grad_(), lambda c, b: g1(c["P1"], c["T"]), sgd(0.3), reads=["T"])
    P2 = mlo.Problem("P2", p20.clone().requires_grad_(), lambda c, b: g2(c["P2"], c["P1"], c["T"]), sgd(0.2),
                     reads=["P1", "T"])
    T = mlo.Problem("T", t0.clone().requires_grad_(), lambda c, b: O(c["P2"], c["T"]), sgd(0.1), reads=["P2"])
    graph = mlo.Graph([T, P1, P2], order=["P1", "P2", "T"])  # list order need not be execution order
    assert rel(mlo.hypergradient(graph, "T")["total"], ref) < 1e-10
    st = mlo.Stepper(graph)
    st.step()
    assert dict(st.vjp_calls) == {"P2->P1,T": 1, "P1->T": 1}

    # different engines on P2's two edges: two VJPs, same answer up to the FD error
    P2.edge_engines = {"T": mlo.FiniteDifference(eps=1e-4)}
    for p, v in ((P1, p10), (P2, p20), (T, t0)):
        with torch.no_grad():
            p.params_tree[""].copy_(v)
    graph = mlo.Graph([P1, P2, T])
    assert rel(mlo.hypergradient(graph, "T")["total"], ref) < 1e-6
    st = mlo.Stepper(graph)
    st.step()
    assert dict(st.vjp_calls) == {"P2->P1": 1, "P2->T": 1, "P1->T": 1}
