"""The report's drill-down: which models get a section (`select_drilldown`) and what each shows
(facts, every detector's score and verdict, Model X-ray's planes, inverted triggers beside the
ground-truth trigger).

The drill-down reads tables; its pictures come from a `ModelPictures` (`xray.explain`, the one
module that goes back to a model file: it re-runs Model X-ray for the planes and re-applies the
stored triggers to a clean example), so the same drawings serve the report and `xray explain`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import pandas as pd

from xray.plots import Finding, Headline
from xray.progress import Progress
from xray.reduce.formatting import first_line, fmt, is_missing
from xray.reduce.report.tables import Manifests, Unit, truth_text
from xray.reduce.summary import verdicts
from xray.results.sink import json_object, read_table

if TYPE_CHECKING:  # the type only: importing it would import torch and the detectors
    from xray.explain import ModelPictures

DEFAULT_MAX_DRILLDOWN = 20  # models with a drill-down section, by default
DEFAULT_PLANES = 3  # Model X-ray planes re-run and drawn per drill-down model
MAX_TRIGGERS_PER_DETECTOR = 3  # inverted triggers drawn per model and detector


# --------------------------------------------------------------------------------------------
# Which models


def select_drilldown(units: Sequence[Any], max_models: int = DEFAULT_MAX_DRILLDOWN,
                     forced: Iterable[str] = ()) -> tuple[list[tuple[str, list[str]]], int]:
    """Models to drill into, with why: `forced` first (in the order given), then models some
    detector got wrong (verdict != ground truth), then models some detector flagged; model id
    order within each. Returns (at most max_models (model_id, reasons)), how many were left out.
    `units`: the report's units (or summary.unit_frames tuples)."""
    reasons: dict[str, list[str]] = {}
    wrong: set[str] = set()
    for unit in units:
        if not isinstance(unit, Unit):
            key, pm, thr, source, _ = unit
            unit = Unit(key, pm, thr, source, key["detector"])
            unit.verdicts = verdicts(pm, thr)
        y = unit.per_model["y"]
        for model_id, verdict in unit.verdicts.items():
            if verdict not in ("trojaned", "clean"):
                continue
            truth = y[model_id]
            if not math.isnan(truth) and (verdict == "trojaned") != (truth == 1):
                kind = "false positive" if verdict == "trojaned" else "false negative"
                reasons.setdefault(model_id, []).append(f"{kind} of {unit.label}")
                wrong.add(model_id)
            elif verdict == "trojaned":
                reasons.setdefault(model_id, []).append(f"flagged by {unit.label}")
    forced = [m for m in dict.fromkeys(str(m) for m in forced)]
    ordered = forced + sorted(m for m in wrong if m not in forced) + sorted(
        m for m in reasons if m not in wrong and m not in forced)
    picked = ordered[:max(0, int(max_models))] if max_models is not None else ordered
    for m in forced:
        reasons.setdefault(m, []).insert(0, "asked for")
    return [(m, reasons.get(m, [])) for m in picked], len(ordered) - len(picked)


# --------------------------------------------------------------------------------------------
# One model


def triggers_for(triggers: pd.DataFrame, model_id: str, unit: Unit,
                  predicted_target: Any) -> pd.DataFrame:
    """The unit's inverted triggers of one model (newest run): those for the detector's predicted
    target first, then by REASR (descending), at most MAX_TRIGGERS_PER_DETECTOR."""
    if triggers.empty:
        return triggers
    rows = triggers[(triggers["model_id"] == model_id)
                    & (triggers["detector"] == unit.key["detector"])
                    & (triggers["config_hash"] == unit.key["config_hash"])]
    if rows.empty:
        return rows
    rows = rows[rows["run_id"] == sorted(rows["run_id"])[-1]]
    hit = rows["target"].eq(predicted_target) if not is_missing(predicted_target) else False
    order = rows.assign(_hit=hit, _reasr=pd.to_numeric(rows["reasr"], errors="coerce").fillna(-1.0))
    order = order.sort_values(["_hit", "_reasr", "trigger_index"], ascending=[False, False, True])
    return order.head(MAX_TRIGGERS_PER_DETECTOR)


def trigger_table(found: Sequence[tuple[str, pd.Series]]) -> list[dict[str, str]]:
    """The drill-down's table of the inverted triggers drawn."""
    return [{"detector": label, "index": fmt(r["trigger_index"]), "target": fmt(r["target"]),
             "victim": "all" if is_missing(r["victim"]) else fmt(r["victim"]),
             "kind": fmt(r["kind"]), "size": fmt(r["size"]), "reasr": fmt(r["reasr"])}
            for label, r in found]


def drilldown(picked: Sequence[tuple[str, list[str]]], units: Sequence[Unit],
              scores: pd.DataFrame, manifests: Manifests, out_uri: str, run_id: str | None,
              planes: int, show_progress: bool = False,
              pictures: ModelPictures | None = None) -> list[dict[str, Any]]:
    """The drill-down entries of the picked models. pictures: what draws Model X-ray's planes
    and the triggers (`xray.explain.ModelPictures`, made on first use when None)."""
    ids = [m for m, _ in picked]
    # the triggers rows of the drill-down models only (filtered while reading)
    triggers = read_table(out_uri, "triggers", run_id=run_id, model_ids=ids)
    made: list[ModelPictures] = [pictures] if pictures is not None else []

    def get_pictures() -> ModelPictures:
        if not made:
            # The model-pictures module re-runs Model X-ray (torch, the detectors): imported
            # only when a drill-down model needs a picture.
            from xray.explain import ModelPictures as Default

            made.append(Default(manifests.runs))
        return made[0]

    targets = scores.drop_duplicates(["model_id", "detector", "config_hash"], keep="last")
    targets = targets.set_index(["model_id", "detector", "config_hash"])
    entries: list[dict[str, Any]] = []
    with Progress(len(picked), "report drill-down", disable=not show_progress) as bar:
        for model_id, reasons in picked:
            entries.append(drill_entry(model_id, reasons, units, triggers, targets, manifests,
                                       get_pictures, planes))
            bar.update()
    return entries


def drill_entry(model_id: str, reasons: list[str], units: Sequence[Unit],
                triggers: pd.DataFrame, targets: pd.DataFrame, manifests: Manifests,
                pictures: Callable[[], ModelPictures], planes: int) -> dict[str, Any]:
    """One model's drill-down: facts, every detector's verdict, planes, triggers."""
    present = [u for u in units if model_id in u.per_model.index]
    if not present:
        return {"model_id": model_id, "reasons": reasons, "truth": "unknown",
                "facts": [], "detectors": [], "planes": [], "triggers_png": None,
                "trigger_rows": [], "notes": ["no score row for this model"]}
    first = present[0].per_model.loc[model_id]
    y = float(first["y"])
    detectors, found, findings = [], [], []
    for unit in present:
        r = unit.per_model.loc[model_id]
        verdict = unit.verdicts[model_id]
        key = (model_id, unit.key["detector"], unit.key["config_hash"])
        target = targets["predicted_target"].get(key) if key in targets.index else None
        correct = None
        if verdict in ("trojaned", "clean") and not math.isnan(y):
            correct = (verdict == "trojaned") == (y == 1)
        detectors.append({
            "label": unit.label, "status": fmt(r["status"]) if not is_missing(
                r["status"]) else "not scored",
            "score": fmt(r["score"], 4), "probability": fmt(r["probability"], 3),
            "threshold": fmt(unit.threshold, 4),
            "verdict": verdict, "correct": correct,
            "target": fmt(target) if not is_missing(target) else "-",
            "seconds": fmt(r["seconds"], 2), "error": first_line(r["error"])})
        findings.append(Finding(
            unit.label, str(verdict), None if is_missing(r["score"]) else float(r["score"]),
            None if math.isnan(unit.threshold) else float(unit.threshold),
            None if is_missing(target) else int(target)))
        for _, t in triggers_for(triggers, model_id, unit, target).iterrows():
            found.append((unit.label, t))
    record, why = manifests.record(model_id)
    true_target = record.target if y == 1 and record is not None else None

    def headline(first: str | None = None) -> Headline:  # `first`'s finding first
        return Headline(model_id, truth_text(y), true_target,
                        tuple(sorted(findings, key=lambda f: f.detector != first)))

    notes = [] if record is not None else [f"pictures not drawn: {why}"]
    drawn_planes = []
    if record is not None and planes > 0:
        for unit in present:
            if unit.detector != "modelxray" or not unit.per_model.at[model_id, "usable"]:
                continue
            stored = json_object(unit.per_model.at[model_id, "stats_json"]).get("re_per_plane")
            try:
                png, note = pictures().planes(unit.key, record, planes, stored,
                                              headline=headline(unit.label))
            except Exception as exc:  # one model's picture never stops the report
                png, note = None, f"planes not drawn: {type(exc).__name__}: {exc}"
            drawn_planes.append({"label": unit.label, "png": png, "note": note})
    trigger_rows = trigger_table(found)
    triggers_png, trigger_notes = None, []
    if found or (y == 1 and record is not None):
        try:
            triggers_png, trigger_notes = pictures().triggers(
                record, y == 1, found, headline=headline(found[0][0] if found else None))
        except Exception as exc:  # one model's picture never stops the report
            trigger_notes = [f"triggers not drawn: {type(exc).__name__}: {exc}"]
    facts = [("ground truth", truth_text(y))]
    if y == 1:
        facts.append(("attack", str(first["attack"])))
        if record is not None and record.target is not None:
            facts.append(("true target", str(record.target)))
    facts.append(("architecture", str(first["architecture"])))
    if first["tags"]:
        facts.append(("tags", ", ".join(f"{k}={v}" for k, v in sorted(first["tags"].items()))))
    return {"model_id": model_id, "reasons": reasons, "truth": truth_text(y),
            "facts": facts, "detectors": detectors, "planes": drawn_planes,
            "triggers_png": triggers_png, "trigger_rows": trigger_rows,
            "notes": notes + trigger_notes}
