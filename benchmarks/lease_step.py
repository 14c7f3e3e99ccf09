"""``python -m benchmarks.lease_step``: the cost of one LeaSE step over one DARTS-2nd step.

Same supernet, same data, same engines (finite difference on every edge, as the
paper), built by ``applications.lease.problems.build_problems``:

* ``DARTS-2nd``: the baseline mode (explainer E and architecture A);
* ``LeaSE-R18`` / ``LeaSE-R50``: the four LeaSE problems with a ResNet-18 /
  ResNet-50 audience;
* ``LeaSE-R18, Δ edge cut``: an ablation, not the paper's method: the explanation
  edge first-order (what signed PGD steps or a detached δ do), so the audience's
  validation loss no longer reaches A. It shows where the paper's cost ratio sits.

``--variants exact`` times instead DARTS-2nd and LeaSE-R18 with the exact one-step
engine on every edge, with and without ``Unrolled(reuse_step_graph=True)`` (the real
step keeps its gradient's graph and the edge is a double backward through it).
``--variants engines`` times finite differences against the exact engine with the kept
step graph, for DARTS-2nd and LeaSE-R18 side by side, and reports each exact step over
its own finite-difference step (wall and process CPU time, paired per repetition): the
measurement behind the digits and known-answer presets' default engines.
``--data synthetic`` builds the batches from the known-answer task instead of digits
(same 8×8 shapes; 4 classes instead of 10).

The paper's search-cost table implies a LeaSE step costs 1.13–1.27× a DARTS-2nd
step (1.7/1.5 and 1.9/1.5 GPU-days). Goal: ≤ 1.3×.

The per-stage breakdown comes from a separate, instrumented run: each
problem's optimizer step marks the end of its stage (explainer, explanation,
audience, architecture), and every edge's VJP in the architecture's sweep is
timed on its own, so the architecture stage splits into its direct gradient
(the validation forward/backward that seeds the adjoints) and one VJP per edge.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch

import mlo

from . import common, nas

GOAL = 1.3
VARIANTS = {"DARTS-2nd": ("baseline", "resnet18", {}), "LeaSE-R18": ("lease", "resnet18", {}),
            "LeaSE-R50": ("lease", "resnet50", {}),
            # ablation, not the paper's chain: the Δ' -> E' link cut (what signed PGD steps do)
            "LeaSE-R18, Δ edge cut": ("lease", "resnet18", {"engines.explanation.name": "first_order"})}
EDGES = {"baseline": ("explainer",), "lease": ("explainer", "explanation", "audience")}


def _exact(mode: str, reuse: bool) -> dict:
    """Every edge on the exact one-step engine; with ``reuse``, through the real step's kept graph."""
    out = {}
    for e in EDGES[mode]:
        out[f"engines.{e}.name"] = "unrolled"
        if reuse:
            out[f"engines.{e}.reuse_step_graph"] = "true"
    return out


# the exact engine, and the same with Unrolled(reuse_step_graph=True) (``--variants exact``)
EXACT = {"DARTS-2nd, exact": ("baseline", "resnet18", _exact("baseline", False)),
         "DARTS-2nd, exact, step graph": ("baseline", "resnet18", _exact("baseline", True)),
         "LeaSE-R18, exact": ("lease", "resnet18", _exact("lease", False)),
         "LeaSE-R18, exact, step graph": ("lease", "resnet18", _exact("lease", True))}
ALL = {**VARIANTS, **EXACT}
# finite differences vs the exact engine through the kept step graph, per mode (``--variants engines``)
ENGINES = ("DARTS-2nd", "DARTS-2nd, exact, step graph", "LeaSE-R18", "LeaSE-R18, exact, step graph")
FD_OF = {"DARTS-2nd, exact": "DARTS-2nd", "DARTS-2nd, exact, step graph": "DARTS-2nd",
         "LeaSE-R18, exact": "LeaSE-R18", "LeaSE-R18, exact, step graph": "LeaSE-R18"}
GOAL_VARIANTS = ("LeaSE-R18", "LeaSE-R50")
STAGES = ("explainer", "explanation", "audience", "architecture")


class TimedEngine(mlo.Engine):
    """Delegates to ``inner`` and adds the wall time of every VJP to ``sink[label]``."""

    def __init__(self, inner: mlo.Engine, label: str, sink: dict, device):
        self.inner, self.label, self.sink, self.device = inner, label, sink, device

    @property
    def needs_records(self):  # type: ignore[override]
        return self.inner.needs_records

    def validate_for(self, problem, where: str) -> None:
        self.inner.validate_for(problem, where)

    @property
    def passes_adjoint(self):  # type: ignore[override]
        return self.inner.passes_adjoint

    @property
    def reuse_step_graph(self):
        return getattr(self.inner, "reuse_step_graph", False)

    def reference(self) -> mlo.Engine:
        return self.inner.reference()

    def vjp(self, site, u, wrt):
        common.sync(self.device)
        t0 = time.perf_counter()
        out = self.inner.vjp(site, u, wrt)
        common.sync(self.device)
        self.sink[self.label] += time.perf_counter() - t0
        return out


def build(variant: str, size: str, seed: int, device, timed: bool = False, data: str = "digits"):
    """``(step(), marks)``: with ``timed``, ``marks`` collects stage end times and edge VJP times."""
    mode, audience, extra = ALL[variant]
    cfg = nas.config(size, mode=mode, audience=audience, **{"data.name": data, **extra})
    fx = nas.fixture(cfg, size, seed, device)
    marks = {"ends": {}, "starts": {}, "edges": defaultdict(float)}

    def first_call(objective, name):
        def timed(ctx, batch):
            if name not in marks["starts"]:
                common.sync(device)
                marks["starts"][name] = time.perf_counter()
            return objective(ctx, batch)
        return timed

    def wrap(problems):
        for p in problems:
            # a dense problem's stage ends with its optimizer step; a row-sparse one (the bank) is
            # updated row by row without optimizer.step(), so its stage ends where the next one starts
            p.torch_optimizer.register_step_post_hook(
                lambda opt, a, k, name=p.name: (common.sync(device), marks["ends"].__setitem__(name, time.perf_counter())))
            p.objective = first_call(p.objective, p.name)
            if not isinstance(p.engine, mlo.FirstOrder) and p.name != "architecture":
                reads = ",".join(p.reads)
                p.engine = TimedEngine(p.engine, f"{p.name}->{reads}", marks["edges"], device)
    step, _ = nas.mlo_step(fx, wrap=wrap if timed else None)
    return step, marks


def breakdown(variant: str, size: str, seed: int, device, reps: int, warmup: int, data: str = "digits") -> dict:
    """Median seconds per stage (and per edge of the architecture's sweep)."""
    step, marks = build(variant, size, seed, device, timed=True, data=data)
    for _ in range(warmup):
        step()
    samples = defaultdict(list)
    for _ in range(reps):
        marks["ends"].clear()
        marks["starts"].clear()
        marks["edges"].clear()
        common.sync(device)
        t0 = time.perf_counter()
        step()
        ends = dict(marks["ends"])
        for stage, after in zip(STAGES, STAGES[1:]):
            if stage not in ends and stage in marks["starts"] and after in marks["starts"]:
                ends[stage] = marks["starts"][after]
        prev = t0
        for stage in STAGES:
            if stage in ends:
                samples[stage].append(ends[stage] - prev)
                prev = ends[stage]
        edges = dict(marks["edges"])
        for label, sec in edges.items():
            samples[f"edge {label}"].append(sec)
        samples["architecture: direct + update"].append(samples["architecture"][-1] - sum(edges.values()))
    return {k: common.summary(v)["median"] for k, v in samples.items()}


def memory_child(variant: str, size: str, seed: int, device: str, warmup: int, data: str = "digits") -> int:
    return common.step_peak(lambda: build(variant, size, seed, device, data=data)[0], device, warmup)


def run(args) -> dict:
    device = torch.device(args.device)
    chosen = {"paper": list(VARIANTS), "exact": ["DARTS-2nd", *EXACT], "engines": list(ENGINES),
              "all": list(ALL)}[args.variants]
    fns = {v: build(v, args.size, args.seed, device, data=args.data)[0] for v in chosen}
    cpu: dict[str, list[float]] = {}
    times = common.time_interleaved(fns, args.reps, args.warmup, device, cpu=cpu)
    mem = {}
    if not args.no_memory and common.memory_supported(device):
        for v in chosen:
            mem[v] = common.isolated("benchmarks.lease_step:memory_child", device, variant=v, size=args.size,
                                     seed=args.seed, device=str(device), warmup=args.warmup, data=args.data)
    rows, goals, stages = [], [], {}
    for v in chosen:
        t, c = common.summary(times[v]), common.summary(cpu[v])
        r = common.paired_ratio(times[v], times["DARTS-2nd"])
        rc = common.paired_ratio(cpu[v], cpu["DARTS-2nd"])
        row = {"variant": v, "time_ms": common.ms(t["median"]), "time_iqr_ms": [common.ms(t["q25"]),
                                                                                 common.ms(t["q75"])],
               "cpu_ms": common.ms(c["median"]),
               "ratio_vs_darts": r["median"], "ratio_iqr": [r["q25"], r["q75"]], "cpu_ratio_vs_darts": rc["median"],
               "peak_mib": common.mib(mem.get(v)),
               "memory_ratio_vs_darts": common.memory_ratio(mem.get(v), mem.get("DARTS-2nd"), device)[0]}
        fd = FD_OF.get(v)
        if fd in times:       # the exact step over the finite-difference step of the same mode, paired
            rf, rfc = common.paired_ratio(times[v], times[fd]), common.paired_ratio(cpu[v], cpu[fd])
            row.update(ratio_vs_fd=rf["median"], ratio_vs_fd_iqr=[rf["q25"], rf["q75"]],
                       cpu_ratio_vs_fd=rfc["median"], cpu_ratio_vs_fd_iqr=[rfc["q25"], rfc["q75"]])
        if not args.no_breakdown:
            stages[v] = breakdown(v, args.size, args.seed, device, args.reps, args.warmup, args.data)
        rows.append(row)
        if v in GOAL_VARIANTS:
            goals.append(common.goal(f"{v} step / DARTS-2nd step (time)", r["median"], GOAL))
        print(f"  {v} done", file=sys.stderr)
    return {"rows": rows, "stages_ms": {v: {k: common.ms(s) for k, s in st.items()} for v, st in stages.items()},
            "goals": goals, "checks": [], "tolerances": {}, "paper_ratio_range": [1.13, 1.27], "data": args.data}


def markdown(result: dict) -> str:
    def iqr(r, key):
        return f"{common.fmt(r[key][0])}–{common.fmt(r[key][1])}" if key in r else None
    rows = [dict(r, iqr=iqr(r, "ratio_iqr"), fd_iqr=iqr(r, "cpu_ratio_vs_fd_iqr")) for r in result["rows"]]
    cols = [("variant", "step"), ("time_ms", "time (ms)"), ("cpu_ms", "CPU (ms)"), ("ratio_vs_darts", "× DARTS-2nd"),
            ("iqr", "ratio IQR"), ("cpu_ratio_vs_darts", "CPU × DARTS-2nd")]
    if any("ratio_vs_fd" in r for r in rows):
        cols += [("ratio_vs_fd", "× its FD step"), ("cpu_ratio_vs_fd", "CPU × its FD step"), ("fd_iqr", "CPU IQR")]
    t = common.markdown_table(rows, cols + [("peak_mib", "peak (MiB)"), ("memory_ratio_vs_darts", "memory × DARTS-2nd")])
    if not result["stages_ms"]:
        return "\n\n".join([t, common.goals_markdown(result["goals"])])
    keys = []
    for st in result["stages_ms"].values():
        keys += [k for k in st if k not in keys]
    stage_rows = [{"stage": k, **{v: st.get(k) for v, st in result["stages_ms"].items()}} for k in keys]
    s = common.markdown_table(stage_rows, [("stage", "stage (ms, median; instrumented run)")]
                              + [(v, v) for v in result["stages_ms"]])
    return "\n\n".join([t, s, common.goals_markdown(result["goals"])])


def plot(result: dict, path: str) -> None:
    if not result["stages_ms"]:
        return
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    variants = list(result["stages_ms"])
    parts = ["explainer", "explanation", "audience", "architecture: direct + update"]
    edge_keys = sorted({k for st in result["stages_ms"].values() for k in st if k.startswith("edge ")})
    bottom = [0.0] * len(variants)
    for key in parts + edge_keys:
        vals = [result["stages_ms"][v].get(key, 0.0) for v in variants]
        ax.bar(variants, vals, bottom=bottom, label=key)
        bottom = [b + x for b, x in zip(bottom, vals)]
    ax.set_ylabel("ms per step (instrumented run)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = common.parser("lease_step", __doc__.splitlines()[0], reps=5, warmup=1)
    parser.add_argument("--variants", choices=("paper", "exact", "engines", "all"), default="paper",
                        help="paper: DARTS-2nd and the LeaSE steps as the paper runs them (finite differences); "
                             "exact: the exact one-step engine with and without Unrolled(reuse_step_graph=True); "
                             "engines: finite differences vs the exact engine with the kept step graph, per mode")
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits",
                        help="the batches: digits (the default preset) or the known-answer task (synthetic preset)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented per-stage run")
    args = common.finish_args(parser.parse_args(argv))
    result = run(args)
    common.write_outputs(args, result, markdown(result), lambda p: plot(result, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
