"""``mlo.check_hypergradient`` on the LeaSE graph (tiny supernet, float64): the explanation
problem declares the architecture it uses as a constant, so the checker holds it fixed as the
engines do, and the exact engines' four-level hypergradient agrees with the central difference."""
import dataclasses

import mlo

from .tiny_graph import exact_config, tiny_lease_graph

# the tiny ReLU/max-pool supernet is strongly curved at this scale: a small step keeps the
# central difference's truncation error (and any kink it might cross) below the tolerance
EPS, TOL = 1e-6, 1e-5


def test_lease_graph_declares_the_architecture_as_a_constant_of_the_explanation():
    graph = tiny_lease_graph(exact_config("unrolled"))[0]
    assert graph.problems["explanation"].constants == ["architecture"]
    report = mlo.check_hypergradient(graph, "architecture", directions=3, eps=EPS, tol=TOL)
    assert report.ok, str(report)
    assert report.reference == mlo.check.COMPOSITION and not report.notes


def test_without_the_declaration_the_checker_says_why_it_disagrees():
    graph = tiny_lease_graph(exact_config("unrolled"))[0]
    problems = [dataclasses.replace(p, constants=()) if p.name == "explanation" else p
                for p in graph.problems.values()]
    report = mlo.check_hypergradient(mlo.Graph(problems), "architecture", directions=3, eps=EPS, tol=TOL)
    assert not report.ok
    assert any("'explanation' uses the parameters of 'architecture' as constants" in n for n in report.notes)


def test_default_finite_difference_engines_check_ok_at_their_limit():
    """The search's default engines (DARTS' central differences, eps=0.01, on every edge) converge
    to the composition: the verdict (at the checker's radius) is OK; on this tiny, strongly curved
    supernet their error at eps=0.01 is large, and the report gives it."""
    graph = tiny_lease_graph(exact_config("finite_difference"))[0]
    assert {s.problem: e for s in graph.plans["architecture"].sweep for _, e in s.wrt} == {
        q: mlo.FiniteDifference(eps=0.01) for q in ("audience", "explanation", "explainer")}
    report = mlo.check_hypergradient(graph, "architecture", directions=1, eps=EPS, tol=TOL)
    assert report.ok, str(report)
    assert report.reference == mlo.check.COMPOSITION and not report.notes
    assert report.configured_error is not None and report.configured_error > 100 * TOL, str(report)
