"""The comparison of two sides: metric deltas against tolerances, flipped verdicts, new and fixed
failures, missing models and detectors, what differs between the runs."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from xray.jsonsafe import json_safe
from xray.reduce.compare.render import render
from xray.reduce.compare.sides import _Side, load_side
from xray.reduce.compare.tolerances import CompareUsageError, ToleranceSet
from xray.reduce.formatting import first_line, is_missing
from xray.reduce.summary import verdicts

METRICS = (  # (summary column, higher is better)
    ("roc_auc", True), ("accuracy", True), ("tpr_at_fpr", True), ("ce", False),
)
RUNTIME = "runtime_p50"


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

    def to_text(self, all_rows: bool = False) -> str:
        """What changed (`render.changed`), or every metric row with all_rows."""
        return render(self, markdown=False, all_rows=all_rows)

    def to_markdown(self, all_rows: bool = False) -> str:
        return render(self, markdown=True, all_rows=all_rows)

    def format(self, fmt: str, all_rows: bool = False) -> str:
        """text / markdown (what changed, or everything with all_rows) / json (everything)."""
        if fmt == "json":
            return self.to_json()
        if fmt == "markdown":
            return self.to_markdown(all_rows)
        if fmt == "text":
            return self.to_text(all_rows)
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


def changed(m: Mapping[str, Any]) -> bool:
    """Whether a metric row shows a change (what `xray compare` prints by default): a
    regression; a move beyond its tolerance either way (runtime: beyond both the ratio and the
    seconds); a group absent from B; a metric defined on one side only. A move within the
    tolerance is not one."""
    if m["status"] == "regression":
        return True
    if m["metric"] == RUNTIME:
        return m["status"] == "improved"
    if m["status"] == "n/a":
        return m["a"] is None or is_missing(m["a"]) != is_missing(m["b"])
    return not is_missing(m["delta"]) and abs(float(m["delta"])) > float(m["tolerance"]) + 1e-12


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
        key_b, pm_b, _, _ = side_b.units[detector]
        tol = tolerances.get(detector)
        # One threshold for both sides, the baseline's: a threshold re-fitted on B (its clean
        # quantile moves with any clean score) would flip models whose score did not change.
        va, vb = verdicts(pm_a, thr_a), verdicts(pm_b, thr_a)
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
                    "threshold": thr_a, "effect": effect})
            ok_a = bool(pm_a.at[model_id, "usable"])
            ok_b = bool(pm_b.at[model_id, "usable"])
            if ok_a != ok_b:
                status = pm_b.at[model_id, "status"] if ok_a else pm_a.at[model_id, "status"]
                error = pm_b.at[model_id, "error"] if ok_a else pm_a.at[model_id, "error"]
                row = {"detector": detector, "model_id": str(model_id),
                       "status": "not scored" if not isinstance(status, str) else status,
                       "error": first_line(error, 300)}
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
    for row in result.metrics:
        row["changed"] = changed(row)
    _model_rows(side_a, side_b, tolerances, result)
    _run_changes(side_a, side_b, result)
    return result
