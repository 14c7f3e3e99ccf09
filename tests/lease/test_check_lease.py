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


def test_default_finite_difference_engines_are_named_as_approximations():
    """The search's default engines (DARTS' central differences, eps=0.01) approximate the one-step
    product the composition differentiates; the report says so on each edge."""
    graph = tiny_lease_graph(exact_config("finite_difference"))[0]
    report = mlo.check_hypergradient(graph, "architecture", directions=1, eps=EPS, tol=TOL)
    assert report.reference == mlo.check.COMPOSITION
    assert sorted(n.split(":")[0] for n in report.notes) == [
        "edge audience->explanation", "edge explainer->architecture", "edge explanation->explainer"]
