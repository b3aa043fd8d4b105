"""Regression comparison of two scans: did anything get worse, and which models flipped?

    result = compare("nightly/base", "nightly/today@20260101T...")   # A = baseline, B = new
    result.regression     # True when something is worse than its tolerance
    print(result.to_text())   # or to_markdown(), to_json()

A side is an output folder, optionally narrowed to one run as ``OUT@RUN_ID``; its scores are
read and de-duplicated as everywhere else (`summary.load_scores`) and summarised with
`summary.summarize` (each side calibrates its own thresholds, exactly as its report shows them).

Detectors are matched by name. When a side holds several configurations of one detector
(detector_version / config_hash), the one with the newest row is compared and the others are
listed as ignored; a version or configuration that differs between the sides is reported (it is
usually the point of the comparison), not judged.

What is judged (each against `Tolerances`; B worse than A by more than the tolerance is a
regression, anything else is reported):

* per detector x group (the summary's groups: all, attack, architecture, tags): ROC-AUC,
  accuracy at the threshold and TPR at the fixed FPR may drop by at most `roc_auc`, `accuracy`,
  `tpr_at_fpr`; TrojAI cross-entropy may rise by at most `ce`. A metric undefined on either side
  (no ground truth, one class) is shown as n/a and not judged.
* per detector (group all): p50 runtime may grow by at most the factor `runtime_ratio`;
  increases under `runtime_min_seconds` never count (timings of small models are noise).
* models whose verdict flipped (score >= threshold on one side, not on the other), with both
  scores: at most `flipped_to_wrong` labelled models may go from a right verdict to a wrong one.
  Flips of unlabelled models and flips to a right verdict are listed, not judged.
* models with an ok score in A and none in B (new errors, timeouts, crashes, not scored): at
  most `new_failures`.
* models of A absent from B: at most `missing_models`; a detector of A absent from B is always a
  regression. Models and detectors new in B are listed.

Defaults (`Tolerances()`): roc_auc 0.05, accuracy 0.05, tpr_at_fpr 0.10, ce 0.10,
runtime_ratio 1.5 with runtime_min_seconds 1.0, flipped_to_wrong 0, new_failures 0,
missing_models 0. A tolerances file (YAML or JSON) overrides any of them, globally and per
detector:

    roc_auc: 0.02
    runtime_ratio: 2.0
    detectors:
      modelxray: {roc_auc: 0.1}
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd
import yaml

from xray.io import storage
from xray.jsonsafe import json_safe
from xray.reduce.formatting import fmt
from xray.reduce.summary import load_scores, summarize, unit_frames, verdicts
from xray.results.sink import read_runs

METRICS = (  # (summary column, higher is better)
    ("roc_auc", True), ("accuracy", True), ("tpr_at_fpr", True), ("ce", False),
)
RUNTIME = "runtime_p50"


class CompareUsageError(ValueError):
    """A side that cannot be read or a malformed tolerances file (the CLI's exit 2)."""


@dataclass(frozen=True)
class Tolerances:
    """How much worse B may be than A before it is a regression (see the module docstring)."""

    roc_auc: float = 0.05            # max drop
    accuracy: float = 0.05           # max drop
    tpr_at_fpr: float = 0.10         # max drop
    ce: float = 0.10                 # max rise
    runtime_ratio: float = 1.5       # max p50(B) / p50(A)
    runtime_min_seconds: float = 1.0  # p50 rises below this are never a regression
    flipped_to_wrong: int = 0        # labelled models: right in A, wrong in B
    new_failures: int = 0            # ok score in A, none in B
    missing_models: int = 0          # models of A absent from B

    def for_detector(self, overrides: Mapping[str, Mapping[str, Any]], detector: str
                     ) -> "Tolerances":
        return dataclasses.replace(self, **dict(overrides.get(detector, {})))


@dataclass(frozen=True)
class ToleranceSet:
    default: Tolerances = Tolerances()
    detectors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def get(self, detector: str) -> Tolerances:
        return self.default.for_detector(self.detectors, detector)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.default),
                "detectors": {k: dict(v) for k, v in self.detectors.items()}}


def _check_keys(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    valid = {f.name: f.type for f in dataclasses.fields(Tolerances)}
    out = {}
    for key, value in values.items():
        if key not in valid:
            raise CompareUsageError(f"{where}: unknown tolerance {key!r}; valid: "
                                    f"{', '.join(sorted(valid))}")
        try:
            out[key] = int(value) if valid[key] == "int" else float(value)
        except (TypeError, ValueError):
            raise CompareUsageError(f"{where}: tolerance {key!r} must be a number, got "
                                    f"{value!r}") from None
    return out


def parse_tolerances(raw: Mapping[str, Any] | None, source: str = "<tolerances>") -> ToleranceSet:
    raw = dict(raw or {})
    per_detector = raw.pop("detectors", None) or {}
    if not isinstance(per_detector, Mapping):
        raise CompareUsageError(f"{source}: 'detectors' must map detector names to tolerances")
    default = Tolerances(**_check_keys(raw, source))
    detectors = {str(name): _check_keys(values or {}, f"{source}: detectors.{name}")
                 for name, values in per_detector.items()}
    return ToleranceSet(default, detectors)


def load_tolerances(uri: str | None) -> ToleranceSet:
    """Tolerances from a YAML / JSON file (None: the defaults)."""
    if not uri:
        return ToleranceSet()
    try:
        raw = yaml.safe_load(storage.read_text(uri))
    except FileNotFoundError:
        raise CompareUsageError(f"tolerances file {uri}: not found") from None
    except yaml.YAMLError as err:
        raise CompareUsageError(f"tolerances file {uri}: not YAML / JSON: {err}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise CompareUsageError(f"tolerances file {uri}: expected a mapping of tolerances")
    return parse_tolerances(raw, source=uri)


# --------------------------------------------------------------------------------------------
# Sides


def parse_side(spec: str) -> tuple[str, str | None]:
    """"OUT" or "OUT@RUN_ID" -> (out, run_id or None)."""
    spec = str(spec)
    if "@" in spec:
        out, run = spec.rsplit("@", 1)
        if out and run and "/" not in run:
            return out, run
    return spec, None


@dataclass
class _Side:
    spec: str
    out: str
    run_id: str | None
    scores: pd.DataFrame
    summary: pd.DataFrame
    units: dict[str, tuple]  # detector -> (unit key, per-model frame, threshold, source)
    ignored: list[dict[str, str]]
    runs: pd.DataFrame


def _runs(out: str, run_id: str | None) -> pd.DataFrame:
    try:
        return read_runs(out, run_id)
    except Exception:  # the comparison of scores does not need it
        return pd.DataFrame()


def load_side(spec: str, thresholds: Mapping[str, float] | None = None) -> _Side:
    out, run_id = parse_side(spec)
    try:
        scores = load_scores(out, run_id)
    except Exception as err:
        raise CompareUsageError(
            f"{spec}: cannot read scores: {type(err).__name__}: {err}") from None
    if scores.empty:
        raise CompareUsageError(f"{spec}: no scores under {out}"
                                + (f" for run {run_id}" if run_id else ""))
    try:
        frames = unit_frames(scores, thresholds)
    except ValueError as err:  # thresholds naming a detector this side does not have
        raise CompareUsageError(f"{spec}: {err}") from None
    candidates: dict[str, list[tuple[Any, tuple]]] = {}
    for key, per_model, threshold, source, _ in frames:
        rows = scores[(scores["detector"] == key["detector"])
                      & (scores["detector_version"] == key["detector_version"])
                      & (scores["config_hash"] == key["config_hash"])]
        candidates.setdefault(key["detector"], []).append(
            (rows["finished_at"].max(), (key, per_model, threshold, source)))
    units: dict[str, tuple] = {}
    ignored = []
    for name, found in candidates.items():
        found.sort(key=lambda c: c[0])
        units[name] = found[-1][1]
        ignored += [{**unit[0], "reason": f"older configuration of {name}"}
                    for _, unit in found[:-1]]
    summary = summarize(scores, thresholds)
    kept = {(k["detector"], k["detector_version"], k["config_hash"]) for k, *_ in units.values()}
    summary = summary[[tuple(r) in kept for r in summary[["detector", "detector_version",
                                                          "config_hash"]].itertuples(index=False)]]
    return _Side(spec, out, run_id, scores, summary.reset_index(drop=True), units, ignored,
                 _runs(out, run_id))


# --------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Comparison:
    """Everything `compare` found; `regression` is the verdict, `regressions` the reasons."""

    a: str
    b: str
    tolerances: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    flips: list[dict[str, Any]] = field(default_factory=list)
    new_failures: list[dict[str, Any]] = field(default_factory=list)
    fixed_failures: list[dict[str, Any]] = field(default_factory=list)
    missing_models: list[str] = field(default_factory=list)
    new_models: list[str] = field(default_factory=list)
    detectors_missing: list[str] = field(default_factory=list)
    detectors_new: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        return bool(self.regressions)

    @property
    def exit_code(self) -> int:
        return 1 if self.regression else 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["regression"] = self.regression
        return json_safe(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_text(self) -> str:
        return _render(self, markdown=False)

    def to_markdown(self) -> str:
        return _render(self, markdown=True)

    def format(self, fmt: str) -> str:
        if fmt == "json":
            return self.to_json()
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "text":
            return self.to_text()
        raise CompareUsageError(f"unknown format {fmt!r}; formats: text, json, markdown")




def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _group(row: pd.Series) -> str:
    return "all" if row["group_by"] == "all" else f"{row['group_by']}={row['group']}"


def _judge_metric(name: str, higher_better: bool, a: float, b: float, tol: float
                  ) -> tuple[str, float]:
    if math.isnan(a) or math.isnan(b):
        return "n/a", math.nan
    delta = b - a
    worse = -delta if higher_better else delta
    if worse > tol + 1e-12:
        return "regression", delta
    if worse < -1e-12:
        return "improved", delta
    return "ok", delta


def _metric_rows(side_a: _Side, side_b: _Side, tolerances: ToleranceSet,
                 result: Comparison) -> None:
    sa = side_a.summary.assign(_group=lambda d: d.apply(_group, axis=1)).set_index(
        ["detector", "_group"])
    sb = side_b.summary.assign(_group=lambda d: d.apply(_group, axis=1)).set_index(
        ["detector", "_group"])
    for key in sa.index:
        detector, group = key
        tol = tolerances.get(detector)
        if key not in sb.index:
            if detector in side_b.units:
                result.metrics.append({"detector": detector, "group": group, "metric": "group",
                                       "a": None, "b": None, "delta": None, "tolerance": None,
                                       "status": "n/a", "note": "group absent from B"})
            continue
        ra, rb = sa.loc[key], sb.loc[key]
        for name, higher_better in METRICS:
            a, b = _num(ra[name]), _num(rb[name])
            limit = getattr(tol, name)
            status, delta = _judge_metric(name, higher_better, a, b, limit)
            note = ""
            if status == "n/a":
                reason = rb["roc_auc_reason"] if math.isnan(b) else ra["roc_auc_reason"]
                note = str(reason) if isinstance(reason, str) else "undefined on one side"
            result.metrics.append({"detector": detector, "group": group, "metric": name, "a": a,
                                   "b": b, "delta": delta, "tolerance": limit, "status": status,
                                   "note": note})
            if status == "regression":
                arrow = "dropped" if higher_better else "rose"
                result.regressions.append(
                    f"{detector} {group}: {name} {arrow} {a:.4f} -> {b:.4f} "
                    f"(tolerance {limit:g})")
        if group == "all":
            a, b = _num(ra[RUNTIME]), _num(rb[RUNTIME])
            status, delta, note = "n/a", math.nan, ""
            if not (math.isnan(a) or math.isnan(b)):
                delta = b - a
                ratio = b / a if a > 0 else math.inf
                status = "ok"
                if ratio > tol.runtime_ratio and delta > tol.runtime_min_seconds:
                    status = "regression"
                    result.regressions.append(
                        f"{detector}: p50 runtime {a:.2f} s -> {b:.2f} s (x{ratio:.2f}, tolerance "
                        f"x{tol.runtime_ratio:g} beyond {tol.runtime_min_seconds:g} s)")
                elif ratio < 1 / tol.runtime_ratio and -delta > tol.runtime_min_seconds:
                    status = "improved"
                note = f"x{ratio:.2f}"
            result.metrics.append({"detector": detector, "group": "all", "metric": RUNTIME,
                                   "a": a, "b": b, "delta": delta,
                                   "tolerance": tol.runtime_ratio, "status": status,
                                   "note": note})


def _model_rows(side_a: _Side, side_b: _Side, tolerances: ToleranceSet,
                result: Comparison) -> None:
    for detector, (key_a, pm_a, thr_a, _) in side_a.units.items():
        if detector not in side_b.units:
            continue
        key_b, pm_b, thr_b, _ = side_b.units[detector]
        tol = tolerances.get(detector)
        va, vb = verdicts(pm_a, thr_a), verdicts(pm_b, thr_b)
        common = pm_a.index.intersection(pm_b.index)
        wrong = 0
        for model_id in common:
            a_v, b_v = va[model_id], vb[model_id]
            y = float(pm_b.at[model_id, "y"])
            if math.isnan(y):
                y = float(pm_a.at[model_id, "y"])
            if a_v in ("trojaned", "clean") and b_v in ("trojaned", "clean") and a_v != b_v:
                effect = "changed (no ground truth)"
                if not math.isnan(y):
                    right_b = (b_v == "trojaned") == (y == 1)
                    effect = "now right" if right_b else "now wrong"
                    wrong += 0 if right_b else 1
                result.flips.append({
                    "detector": detector, "model_id": str(model_id),
                    "truth": "unknown" if math.isnan(y) else "trojaned" if y == 1 else "clean",
                    "verdict_a": a_v, "verdict_b": b_v,
                    "score_a": _num(pm_a.at[model_id, "score"]),
                    "score_b": _num(pm_b.at[model_id, "score"]),
                    "threshold_a": thr_a, "threshold_b": thr_b, "effect": effect})
            ok_a = bool(pm_a.at[model_id, "usable"])
            ok_b = bool(pm_b.at[model_id, "usable"])
            if ok_a != ok_b:
                status = pm_b.at[model_id, "status"] if ok_a else pm_a.at[model_id, "status"]
                error = pm_b.at[model_id, "error"] if ok_a else pm_a.at[model_id, "error"]
                row = {"detector": detector, "model_id": str(model_id),
                       "status": "not scored" if not isinstance(status, str) else status,
                       "error": (error.strip().splitlines() or [""])[0][:300]
                       if isinstance(error, str) else ""}
                (result.new_failures if ok_a else result.fixed_failures).append(row)
        if wrong > tol.flipped_to_wrong:
            result.regressions.append(f"{detector}: {wrong} labelled model(s) flipped to a wrong "
                                      f"verdict (tolerance {tol.flipped_to_wrong})")
        new = sum(1 for f in result.new_failures if f["detector"] == detector)
        if new > tol.new_failures:
            result.regressions.append(f"{detector}: {new} model(s) lost their ok score (new "
                                      f"errors / timeouts; tolerance {tol.new_failures})")
        if (key_a["detector_version"], key_a["config_hash"]) != (key_b["detector_version"],
                                                                key_b["config_hash"]):
            result.changes.append({
                "what": f"detector {detector}",
                "a": f"version {key_a['detector_version']}, config {key_a['config_hash']}",
                "b": f"version {key_b['detector_version']}, config {key_b['config_hash']}",
                "detail": _settings_diff(side_a, side_b, detector)})


def _detector_settings(side: _Side, detector: str) -> Any:
    """The detector's entry in the newest run config of the side that names it."""
    runs = side.runs
    if runs.empty or "config_json" not in runs.columns:
        return None
    for text in runs["config_json"].iloc[::-1]:
        try:
            config = json.loads(text)
        except (TypeError, ValueError):
            continue
        detectors = config.get("detectors") or {}
        if isinstance(detectors, dict) and detector in detectors:
            return {"seed": config.get("seed"),
                    "examples_per_class": config.get("examples_per_class"),
                    **(detectors[detector] or {})}
    return None


def _settings_diff(side_a: _Side, side_b: _Side, detector: str) -> str:
    a, b = _detector_settings(side_a, detector), _detector_settings(side_b, detector)
    if a is None or b is None:
        return "settings not in the runs tables"
    if a == b:
        return "same settings in the run configs (code / detector version differs)"
    return f"A {json.dumps(a, sort_keys=True)} ; B {json.dumps(b, sort_keys=True)}"


def _run_changes(side_a: _Side, side_b: _Side, result: Comparison) -> None:
    for column, what in (("code_version", "code version"), ("manifest_digest", "manifest digest")):
        values = []
        for side in (side_a, side_b):
            runs = side.runs
            values.append(sorted(set(runs[column].astype(str))) if len(runs) and column in
                          runs.columns else [])
        if values[0] and values[1] and values[0] != values[1]:
            result.changes.append({"what": what, "a": ", ".join(values[0]),
                                   "b": ", ".join(values[1]), "detail": ""})


def compare(a: str, b: str, tolerances: ToleranceSet | None = None, *,
            thresholds: Mapping[str, float] | None = None) -> Comparison:
    """Compare scan B against scan A (the baseline); see the module docstring."""
    tolerances = tolerances or ToleranceSet()
    side_a, side_b = load_side(a, thresholds), load_side(b, thresholds)
    result = Comparison(a=str(a), b=str(b), tolerances=tolerances.to_dict())
    result.ignored = [{**i, "side": "A"} for i in side_a.ignored] + [
        {**i, "side": "B"} for i in side_b.ignored]
    result.detectors_missing = sorted(set(side_a.units) - set(side_b.units))
    result.detectors_new = sorted(set(side_b.units) - set(side_a.units))
    for name in result.detectors_missing:
        result.regressions.append(f"detector {name} is in A but not in B")
    models_a = set(side_a.scores["model_id"].astype(str))
    models_b = set(side_b.scores["model_id"].astype(str))
    result.missing_models = sorted(models_a - models_b)
    result.new_models = sorted(models_b - models_a)
    allowed = tolerances.default.missing_models
    if len(result.missing_models) > allowed:
        result.regressions.append(f"{len(result.missing_models)} model(s) of A are missing from "
                                  f"B (tolerance {allowed})")
    _metric_rows(side_a, side_b, tolerances, result)
    _model_rows(side_a, side_b, tolerances, result)
    _run_changes(side_a, side_b, result)
    return result


# --------------------------------------------------------------------------------------------
# Rendering


def _delta(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):+.4f}"


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _render(result: Comparison, markdown: bool) -> str:
    h = (lambda t: f"\n## {t}\n") if markdown else (lambda t: f"\n{t}\n{'-' * len(t)}")
    verdict = ("REGRESSION" if result.regression else "no regression (within tolerance)")
    out = [("# " if markdown else "") + f"xray compare: {verdict}",
           f"A (baseline): {result.a}", f"B (new):      {result.b}"]
    if markdown:
        out[1:] = [f"- A (baseline): `{result.a}`", f"- B (new): `{result.b}`"]
    if result.regressions:
        out.append(h("Regressions"))
        out += [("- " if markdown else "  ") + r for r in result.regressions]
    out.append(h("Metrics per detector x group (delta = B - A)"))
    rows = [[m["detector"], m["group"], m["metric"], fmt(m["a"], 4), fmt(m["b"], 4),
             _delta(m["delta"]),
             fmt(m["tolerance"], 3) if m["tolerance"] is not None else "-", m["status"],
             m.get("note") or ""] for m in result.metrics]
    out.append(_table(["detector", "group", "metric", "A", "B", "delta", "tolerance", "status",
                       "note"], rows, markdown) if rows else "(no common detector)")
    out.append(h(f"Flipped verdicts ({len(result.flips)})"))
    rows = [[f["detector"], f["model_id"], f["truth"], f["verdict_a"], f["verdict_b"],
             fmt(f["score_a"], 4), fmt(f["score_b"], 4), f["effect"]] for f in result.flips]
    out.append(_table(["detector", "model", "truth", "verdict A", "verdict B", "score A",
                       "score B", "effect"], rows, markdown) if rows else "none")
    for title, items in (("New errors / timeouts", result.new_failures),
                         ("Fixed errors / timeouts", result.fixed_failures)):
        out.append(h(f"{title} ({len(items)})"))
        rows = [[f["detector"], f["model_id"], f["status"], f["error"]] for f in items]
        out.append(_table(["detector", "model", "status", "error"], rows, markdown)
                   if rows else "none")
    out.append(h("Models and detectors"))
    for label, items in (("models missing from B", result.missing_models),
                         ("models new in B", result.new_models),
                         ("detectors missing from B", result.detectors_missing),
                         ("detectors new in B", result.detectors_new)):
        shown = ", ".join(items[:50]) + (f" and {len(items) - 50} more" if len(items) > 50 else "")
        out.append(("- " if markdown else "  ") + f"{label}: {shown or 'none'}")
    out.append(h("What differs between the runs"))
    if result.changes:
        rows = [[c["what"], c["a"], c["b"], c["detail"]] for c in result.changes]
        out.append(_table(["what", "A", "B", "detail"], rows, markdown))
    else:
        out.append("nothing (same detector versions, configurations, code and manifest)")
    for i in result.ignored:
        out.append(("- " if markdown else "  ") + f"ignored on side {i['side']}: {i['detector']} "
                   f"{i['detector_version']} [{i['config_hash']}] ({i['reason']})")
    return "\n".join(out) + "\n"
