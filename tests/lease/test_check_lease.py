"""``mlo.check_hypergradient`` on the LeaSE graph (tiny supernet, float64), with the checker's own
radius and tolerance: the explanation problem declares the architecture it uses as a constant, so
the checker holds it fixed as the engines do; the exact engines' four-level hypergradient agrees
with the central differences of the composition (taken where it is smooth: the tiny ReLU/max-pool
supernet is strongly curved and kinked at this scale); declared stop-gradients are held too."""
import dataclasses
import os
import re

import pytest

import mlo
from applications.common import load_config
from applications.lease import explain
from applications.lease.config import SearchConfig

from .tiny_graph import exact_config, tiny_lease_graph


def test_lease_graph_declares_the_architecture_as_a_constant_of_the_explanation():
    graph = tiny_lease_graph(exact_config("unrolled"))[0]
    assert graph.problems["explanation"].constants == ["architecture"]
    report = mlo.check_hypergradient(graph, "architecture", directions=3)
    assert report.ok, str(report)
    assert report.reference == mlo.check.COMPOSITION and not report.notes


def test_without_the_declaration_the_checker_says_why_it_disagrees():
    graph = tiny_lease_graph(exact_config("unrolled"))[0]
    problems = [dataclasses.replace(p, constants=()) if p.name == "explanation" else p
                for p in graph.problems.values()]
    report = mlo.check_hypergradient(mlo.Graph(problems), "architecture", directions=3)
    assert not report.ok
    assert any("'explanation' uses the parameters of 'architecture' as constants" in n for n in report.notes)


def test_default_finite_difference_engines_check_ok_at_their_limit():
    """The search's default engines (DARTS' central differences, eps=0.01, on every edge) converge
    to the composition: the verdict (at the checker's radius) is OK; on this tiny, strongly curved
    supernet their error at eps=0.01 is large, and the report gives it."""
    graph = tiny_lease_graph(exact_config("finite_difference"))[0]
    assert {s.problem: e for s in graph.plans["architecture"].sweep for _, e in s.wrt} == {
        q: mlo.FiniteDifference(eps=0.01) for q in ("audience", "explanation", "explainer")}
    report = mlo.check_hypergradient(graph, "architecture", directions=1)
    assert report.ok, str(report)
    assert report.reference == mlo.check.COMPOSITION and not report.notes
    assert report.configured_error is not None and report.configured_error > 1e-3, str(report)


DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "applications", "lease", "configs", "digits.yaml")


@pytest.mark.parametrize("engines", ["preset", "finite_difference"])
def test_the_digits_preset_checks_without_choosing_eps(engines):
    """The shipped search graph (its ReLUs and max-pools, BatchNorm, momentum, clipping, the
    row-sparse bank), small and in float64, with the checker's default arguments: OK, or the one
    sentence naming the non-smoothness — never a MISMATCH caused by kinks inside its radius. Also
    with the paper's finite differences on every edge (judged at their limit)."""
    sets = ["dtype=float64"]
    if engines != "preset":
        sets += [f"engines.{e}={engines}" for e in ("explainer", "explanation", "audience")]
    graph = tiny_lease_graph(load_config(SearchConfig, DIGITS, sets))[0]
    report = mlo.check_hypergradient(graph, "architecture")
    first = str(report).splitlines()[0]
    assert report.ok or re.fullmatch(r"cannot check here: non-smooth at radius \S+ \(ReLU/max-pool kinks\)",
                                     first), str(report)
    assert not report.notes, str(report)


def test_a_first_order_explainer_term_checks_ok():
    """``explainer_val_order: first``: the architecture's own validation term uses E' without its
    dependence on A (``ctx.forward(constants=("explainer",))``); the reference holds it too."""
    graph = tiny_lease_graph(exact_config("unrolled", explainer_val_order="first"))[0]
    report = mlo.check_hypergradient(graph, "architecture", directions=3)
    assert report.ok and not report.notes, str(report)


def test_a_detached_target_variant_checks_ok():
    """The explanation loss with its clean prediction (the target) as a stop-gradient of E'."""
    graph, explainer = tiny_lease_graph(exact_config("unrolled"))[:2]

    def detached_target(ctx, batch):
        x, _, idx = batch
        perturbed = ctx.forward(explainer, x + ctx["explanation"][idx])
        clean = ctx.forward(explainer, x, constants=("explainer",))
        return explain.explanation_loss(perturbed, clean)
    problems = [dataclasses.replace(p, objective=detached_target) if p.name == "explanation" else p
                for p in graph.problems.values()]
    variant = mlo.Graph(problems)
    report = mlo.check_hypergradient(variant, "architecture", directions=3)
    assert report.ok, str(report)
    full = mlo.hypergradient(graph, "architecture")["total"]
    cut = mlo.hypergradient(variant, "architecture")["total"]
    assert max(float((full[k] - cut[k]).abs().max()) for k in full) > 1e-8   # the stop-gradient changes it


def test_pgd_explanations_check_ok_with_their_cut_edge_named():
    """PGD explanations take FirstOrder on the explanation edge: the reference cuts it too (the
    row-sparse bank's steps see the explainer's unperturbed value), and the note says so."""
    graph = tiny_lease_graph(exact_config("unrolled", **{"explain.method": "pgd", "explain.pgd_steps": 2}))[0]
    report = mlo.check_hypergradient(graph, "architecture", directions=3)
    assert report.ok, str(report)
    assert [n.split(":")[0] for n in report.notes] == ["edge explanation->explainer"]
    assert "FirstOrder drops the path through it; the reference drops it too" in report.notes[0]
