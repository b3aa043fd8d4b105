"""Upstream scanner + EX-RAY: "nc+exray", "abs+exray", "karm+exray".

Paper: Liu et al., "Complex Backdoor Detection by Symmetric Feature Differencing", CVPR 2022
(ABS+EX-RAY Table 9, NC+EX-RAY Table 14, K-Arm+EX-RAY Table 8). Reference code: PurduePAML/Exray
abs_pytorch1_both_batch_inner_both_with_prune.py (ABS then prune per trigger). Spec:
docs/algorithms/exray.md "Model-level score".

    result = upstream.score(model, data, ctx)           # candidates in artifacts["candidates"]
    selected = the candidates the upstream itself reports (ABS: kept (flip >= keep_flip);
               NC: labels flagged by the MAD test; K-Arm: the arms it calls trojaned,
               candidate.stats["trojaned"]; none when K-Arm calls the model benign)
    tested = selected with REASR >= run_bound           # default 0.9 (r3); ref 0.99
    EX-RAY (exray.py) on all tested candidates at once; natural -> that candidate's score 0
    score = max surviving REASR over selected candidates (0 if none): a probability, not 0/1

Every trigger row carries the upstream's columns plus exray_tested, exray_score and, when
tested, EX-RAY's verdict (exray_natural, exray_clause), s1, s2 and the four accuracies.
stats["steps"] = the upstream's optimisation steps + EX-RAY's mask steps (proof of work), also
when the scan shared the upstream's run with the vanilla scanner (stats["upstream_shared"]: the
row's seconds are then EX-RAY's alone);
stats["stopped_early"] when the model's deadline cut either short (EX-RAY then keeps the
triggers it could not examine, verdict "deadline").

Params: the upstream's own fields (same names, same defaults), EX-RAY's fields prefixed
"exray_", and run_bound / upstream_selection; presets merge the upstream's and EX-RAY's ("r3"
is EX-RAY's round-3 variant). Deviation: `upstream_selection=False` tests every candidate the
scanner returned (NC then examines all labels' triggers) (inferred; the paper prunes the
triggers the scanner reports).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import torch

import xray.detectors.inversion.abs  # noqa: F401  (the upstream scanners register themselves)
import xray.detectors.inversion.karm  # noqa: F401
import xray.detectors.inversion.nc  # noqa: F401
from xray.detectors._registry import DETECTORS, register
from xray.detectors.base import DetectorResult, ScanContext, ScanData
from xray.detectors.exray import ExRay

PREFIX = "exray_"
UPSTREAMS = ("nc", "abs", "karm")


def _field(f: dataclasses.Field, name: str) -> tuple[str, Any, dataclasses.Field]:
    if f.default is not dataclasses.MISSING:
        return name, f.type, dataclasses.field(default=f.default)
    return name, f.type, dataclasses.field(default_factory=f.default_factory)


def composed_params(upstream: type) -> type:
    """A frozen dataclass: upstream fields, exray_* fields, run_bound, upstream_selection."""
    fields = [_field(f, f.name) for f in dataclasses.fields(upstream.Params)]
    fields += [_field(f, PREFIX + f.name) for f in dataclasses.fields(ExRay.Params)]
    fields += [("run_bound", float, dataclasses.field(default=0.9)),
               ("upstream_selection", bool, dataclasses.field(default=True))]
    names = [f[0] for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"{upstream.name}+exray: parameter names collide: {names}")
    return dataclasses.make_dataclass("Params", fields, frozen=True)


def composed_presets(upstream: type) -> dict[str, dict[str, Any]]:
    up, ex = getattr(upstream, "presets", {}), ExRay.presets
    out = {}
    for name in sorted(set(up) | set(ex)):
        out[name] = {**up.get(name, {}), **{PREFIX + k: v for k, v in ex.get(name, {}).items()}}
    out.setdefault("reference", {})["run_bound"] = 0.99  # (ref) prunes candidates > 0.99
    return out


def selected(upstream_name: str, candidate: Any, result: DetectorResult) -> bool:
    """Whether the upstream scanner itself reports this candidate (see module docstring)."""
    if upstream_name == "nc":
        return int(candidate.target) in set(result.stats.get("flagged", []))
    if upstream_name == "karm":  # K-Arm marks each arm; a missing mark is a bug, not "all"
        return bool(candidate.stats["trojaned"])
    return bool(candidate.stats.get("kept", True))


class Composed:
    """Base of the composed detectors; `compose(upstream)` makes the registered subclass."""

    upstream_cls: ClassVar[type]
    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]]

    def __init__(self, params: Any = None) -> None:
        self.params = params or self.Params()
        values = dataclasses.asdict(self.params)
        up = self.upstream_cls
        self.upstream = up(up.Params(**{f.name: getattr(self.params, f.name)
                                        for f in dataclasses.fields(up.Params)}))
        self.exray = ExRay(ExRay.Params(**{f.name: values[PREFIX + f.name]
                                           for f in dataclasses.fields(ExRay.Params)}))

    def upstream_key(self) -> tuple[type, Any]:
        """(scanner class, parameters) of the upstream run this detector needs: equal to a
        vanilla detector's (type(d), d.params) when that one computes the same thing."""
        return type(self.upstream), self.upstream.params

    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext,
              upstream: DetectorResult | None = None) -> DetectorResult:
        """upstream: the upstream scanner's result on this model with `upstream_key`'s
        parameters, when the scan already has it (xray.scanning shares one run between a
        vanilla scanner and its composed twin); else the upstream runs here. Either way the
        upstream's result is returned in artifacts["upstream_result"]."""
        p = self.params
        shared = upstream is not None
        result = upstream if upstream is not None else self.upstream.score(model, data, ctx)
        cands = list(result.artifacts.get("candidates", []))
        chosen = [not p.upstream_selection or selected(self.upstream_cls.name, c, result)
                  for c in cands]
        tested = [i for i, c in enumerate(cands) if chosen[i] and c.reasr >= p.run_bound]
        started = time.perf_counter()
        verdicts = self.exray.examine(model, data, [cands[i] for i in tested], ctx) \
            if tested else []
        exray_seconds = time.perf_counter() - started
        exray_steps = sum(int(v.stats.get("steps", 0)) for v in verdicts)
        verdict_of = dict(zip(tested, verdicts))
        rows, scores = [], []
        for i, c in enumerate(cands):
            v = verdict_of.get(i)
            s = 0.0 if v is not None and v.natural else float(c.reasr)
            row = c.to_row()
            row.update({"exray_tested": v is not None, "exray_score": s if chosen[i] else None,
                        "upstream_selected": chosen[i]})
            if v is not None:
                row.update(v.row())
            rows.append(row)
            if chosen[i]:
                scores.append((s, i))
        best = max(scores, default=(0.0, None))
        target = None if best[1] is None or best[0] <= 0 else int(cands[best[1]].target)
        stats = {"upstream_score": float(result.score), "upstream_target": result.target,
                 "candidates": len(cands), "selected": sum(chosen), "tested": len(tested),
                 "pruned": sum(v.natural for v in verdicts),
                 "survivors": sum(1 for s, _ in scores if s >= p.run_bound),
                 "clauses": sorted({v.clause for v in verdicts}),
                 "steps": int(result.stats["steps"]) + exray_steps,
                 "exray_steps": exray_steps,
                 "stopped_early": bool(result.stats.get("stopped_early"))
                 or any(v.stats.get("stopped_early") for v in verdicts),
                 "exray_seconds": exray_seconds,
                 "exray_seconds_per_trigger": exray_seconds / len(tested) if tested else 0.0,
                 "best_reasr_upstream": max((float(c.reasr) for c, ok in zip(cands, chosen)
                                             if ok), default=0.0),
                 "upstream": result.stats, "upstream_shared": shared}
        return DetectorResult(score=float(best[0]), target=target, stats=stats, triggers=rows,
                              artifacts={**result.artifacts, "verdicts": verdicts,
                                         "tested": tested, "upstream_result": result})


def compose(upstream_name: str) -> type:
    """Register "<upstream>+exray" for a registered upstream scanner."""
    up = DETECTORS.get(upstream_name)
    cls = type(f"{up.__name__}ExRay", (Composed,), {
        "upstream_cls": up, "name": f"{upstream_name}+exray",
        "version": f"{up.version}+{ExRay.version}", "Params": composed_params(up),
        "presets": composed_presets(up), "__doc__": f"{upstream_name} + EX-RAY. " + __doc__})
    cls.Params.__qualname__ = f"{cls.__name__}.Params"
    return register(cls.name)(cls)


# Import side effect (like every detector module): one composed detector per upstream scanner
# (imported above, so registered before this runs).
for _name in UPSTREAMS:
    if _name in DETECTORS and f"{_name}+exray" not in DETECTORS:
        compose(_name)
