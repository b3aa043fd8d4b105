"""Model pictures: the one place that goes back to a scanned model, for `xray explain` and for the
report's drill-down alike.

    explain_model(out, model_id)       # Model X-ray's decision-boundary planes, as a PNG
    explain_triggers(out, model_id)    # inverted triggers beside the ground truth, as a PNG
    ModelPictures(runs)                # what render_report draws per drill-down model

The reducer (xray.reduce) only reads tables; what it needs from a model comes from here:
* Model X-ray planes: the detector is re-run on the model (`scan_model`, keep_artifacts) with
  the parameters its run used (same seed, same examples). Planes are drawn one after the other
  from one seeded generator, so plane k of a run limited to its first n planes is plane k of
  the scan; `ModelPictures.planes` checks this against the scan's stored per-plane RE and says
  whether they match. The scores table is never touched.
* Inverted triggers: rows of the `triggers` table (mask / pattern as np.save bytes, pixel space
  assumed), re-applied exactly as the scanner applied them (`TriggerCandidate.apply`) to one
  clean example of the model whose label is no trigger's target.
* Ground-truth trigger: when the model's directory holds a zoo / TrojAI config.json with a
  `trigger` the zoo's attacks can rebuild, the same clean example with the true trigger applied
  and the difference it makes; else the first poisoned example image when there is one.
Every picture is drawn through `xray.plots` (matplotlib's object API, no pyplot) and titled with
a `Headline`: the model id, its ground truth and true target, and each detector's verdict, score
against threshold and predicted target (`model_headline` reads them from the scores table, the
report passes its own); the planes carry a class-colour legend with the predicted target marked.
`xray explain` puts the best inverted trigger of each scanner and the true trigger beside the
planes.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from xray import detectors as registry
from xray.config import parse_config
from xray.detectors.inversion.core import TriggerCandidate
from xray.io import storage
from xray.io.examples import load_examples
from xray.plots import (
    Finding,
    Headline,
    Panel,
    as_image,
    as_mask,
    panels_figure,
    planes_figure,
    png_base64,
    png_bytes,
)
from xray.reduce.formatting import first_line, fmt, is_missing
from xray.results import locations
from xray.results.sink import read_runs, read_table
from xray.scanning import scan_model
from xray.zoo.round import load_attack, trigger_config

PLANES_RTOL = 1e-4  # re-run per-plane RE vs the scan's stored value


# --------------------------------------------------------------------------------------------
# Model X-ray planes


def rerun_planes(record: Any, detector: Any, config: Any) -> tuple[list[dict] | None, dict]:
    """Model X-ray re-run on one model: (its planes, or None when it failed; its score row)."""
    result = scan_model(record, [detector], config, keep_artifacts=True)
    row = result["scores"][0]
    if row["status"] != "ok":
        return None, row
    return result["artifacts"][detector.name]["planes"], row


def planes_png(planes: Sequence[dict], num_classes: int, max_planes: int,
               headline: Headline | None = None, total: int | None = None,
               triggers: Sequence[Sequence[Panel]] = (), dpi: int = 100,
               cols: int = 4) -> bytes:
    """The first max_planes planes (`xray.plots.planes_figure`) as PNG bytes."""
    fig = planes_figure(list(planes)[:max(1, int(max_planes))], num_classes, headline,
                        total=total or len(planes), triggers=triggers, cols=cols)
    return png_bytes(fig, dpi=dpi)


def model_headline(out_uri: str, model_id: str, record: Any = None,
                   first: str = "modelxray") -> Headline:
    """The titles' facts of one model from the scores table of `out_uri` (all runs): every
    detector's verdict at its unit's threshold (as the summary sets it), score, predicted target;
    `first`'s finding first. Ground truth and true target from the manifest record, else the
    scores' gt columns."""
    from xray.reduce.summary import load_scores, unit_frames, verdicts

    scores = load_scores(out_uri)
    mine = scores[scores["model_id"] == model_id]
    findings = []
    for key, per_model, threshold, _, _ in unit_frames(scores):
        if model_id not in per_model.index:
            continue
        verdict = str(verdicts(per_model.loc[[model_id]], threshold).iloc[0])
        rows = mine[(mine["detector"] == key["detector"])
                    & (mine["config_hash"] == key["config_hash"])]
        target = rows["predicted_target"].iloc[-1] if len(rows) else None
        findings.append(Finding(
            key["detector"], verdict, float(per_model.at[model_id, "score"]),
            None if math.isnan(threshold) else float(threshold),
            None if is_missing(target) else int(target)))
    findings.sort(key=lambda f: f.detector != first)
    poisoned = record.poisoned if record is not None else None
    true_target = record.target if record is not None else None
    if poisoned is None and len(mine) and not is_missing(mine["gt_poisoned"].iloc[-1]):
        poisoned = bool(mine["gt_poisoned"].iloc[-1])
    if true_target is None and len(mine) and not is_missing(mine["gt_target"].iloc[-1]):
        true_target = int(mine["gt_target"].iloc[-1])
    truth = "unknown" if poisoned is None else "trojaned" if poisoned else "clean"
    return Headline(model_id, truth, true_target if poisoned else None, tuple(findings))


# --------------------------------------------------------------------------------------------
# Inverted and ground-truth triggers


def _npy(blob: Any) -> np.ndarray | None:
    if blob is None or (isinstance(blob, float) and math.isnan(blob)):
        return None
    try:
        return np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
    except Exception:
        return None


def _model_dir(record: Any) -> str:
    return record.uri.rsplit("/", 1)[0] if "/" in record.uri else "."


def ground_truth_trigger(record: Any, x: np.ndarray) -> tuple[dict[str, Any] | None, str]:
    """The true trigger of a trojaned model: applied to `x` (1, C, H, W), from the model dir's
    config.json; else the first poisoned example image. (None, why) when neither is there."""
    trigger = trigger_config(record.uri)
    description = json.dumps(trigger, sort_keys=True) if trigger else ""
    if trigger:
        try:
            attack = load_attack(_model_dir(record))
            stamped = attack.apply(x.astype(np.float32))
            return {"stamped": stamped[0], "diff": np.abs(stamped[0] - x[0]).max(axis=0),
                    "text": description}, ""
        except Exception:  # an attack this code cannot rebuild: fall back to an image
            pass
    poisoned = storage.join(_model_dir(record), "poisoned_example_data")
    names = [n for n in storage.listdir(poisoned) if n.lower().endswith(".png")]
    if names:
        from PIL import Image

        with Image.open(io.BytesIO(storage.read_bytes(storage.join(poisoned, names[0])))) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return {"stamped": np.transpose(image, (2, 0, 1)), "diff": None,
                "text": description or f"poisoned example {names[0]}"}, ""
    return None, "no trigger description or poisoned example beside the model"


def pick_example(xs: np.ndarray, ys: np.ndarray, record: Any,
                 found: Sequence[tuple[str, Mapping[str, Any]]]) -> np.ndarray:
    """One clean example (1, C, H, W) whose label is no inverted trigger's target nor the true
    target (the first example when every label is one)."""
    targets = {int(r["target"]) for _, r in found if not is_missing(r["target"])}
    if record.target is not None:
        targets.add(int(record.target))
    pick = next((i for i in range(len(ys)) if int(ys[i]) not in targets), 0)
    return xs[pick:pick + 1]


def trigger_panels(record: Any, x: np.ndarray | None, trojaned: bool,
                   found: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[list[list], list[str]]:
    """The rows of the triggers figure and notes: the ground-truth row (trojaned models: clean
    example, true trigger applied, |difference|), then per inverted trigger its mask, pattern
    and the stamped example. found: (label, `triggers` row) pairs; x: (1, C, H, W) or None."""
    notes: list[str] = []
    rows: list[list] = []
    if trojaned and record is not None and x is not None:
        gt, why = ground_truth_trigger(record, x)
        if gt is None:
            notes.append(f"ground-truth trigger: {why}")
        else:
            row = [("clean example", as_image(x[0]), None),
                   (f"true trigger applied (target {fmt(record.target)})",
                    as_image(gt["stamped"]), None)]
            if gt["diff"] is not None:
                row.append(("|difference|", gt["diff"], "magma"))
            rows.append(row)
            notes.append(f"ground truth: {gt['text']}")
    for label, r in found:
        mask, pattern = _npy(r["mask"]), _npy(r["pattern"])
        title = f"{label} inverted #{int(r['trigger_index'])} -> {fmt(r['target'])}"
        row = []
        if mask is not None:
            row.append((f"{title}: mask", as_mask(mask), "gray"))
        if pattern is not None:
            row.append(("pattern", as_image(pattern), None))
        if x is not None:  # re-applied exactly as the scanner applied it (TriggerCandidate)
            try:
                row_dict = r.to_dict() if hasattr(r, "to_dict") else dict(r)
                candidate = TriggerCandidate.from_row(row_dict)
                stamped = candidate.apply(torch.as_tensor(x, dtype=torch.float32))[0].numpy()
                row.append(("stamped example", as_image(stamped), None))
            except Exception as exc:  # a row this build cannot re-apply: draw the rest
                notes.append(f"{title}: cannot re-apply ({type(exc).__name__}: {exc})")
        if not row:
            notes.append(f"{title}: no mask or pattern stored ({fmt(r['kind'])} trigger)")
            continue
        rows.append(row)
    return rows, notes


# --------------------------------------------------------------------------------------------
# What the report needs


class ModelPictures:
    """The report's model pictures (`xray.reduce.report` calls `planes` and `triggers`), with
    lazy, cached run configurations and examples. runs: the runs table, one row per run."""

    def __init__(self, runs: pd.DataFrame) -> None:
        self.runs = runs
        self._configs: dict[str, Any] = {}
        self._examples: dict[str, Any] = {}

    def _config(self, run: pd.Series) -> Any:
        run_id = str(run["run_id"])
        if run_id not in self._configs:
            try:
                self._configs[run_id] = parse_config(json.loads(run["config_json"]),
                                                     source=f"run {run_id}", stored=True)
            except Exception as exc:
                self._configs[run_id] = exc
        return self._configs[run_id]

    def detector_config(self, key: Mapping[str, str]) -> tuple[Any, Any, str]:
        """(ScanConfig, built detector) of a run whose config reproduces the unit's hash."""
        if self.runs.empty or "config_json" not in self.runs.columns:
            return None, None, "no runs table holding the scan's configuration"
        for _, run in self.runs.iloc[::-1].iterrows():
            config = self._config(run)
            if isinstance(config, Exception):
                continue
            for spec in config.detectors:
                if spec.name != key["detector"]:
                    continue
                try:
                    detector = spec.build()
                except Exception:
                    continue
                if config.detector_hash(detector) == key["config_hash"]:
                    return config, detector, ""
        return None, None, (f"no run's configuration reproduces {key['detector']} "
                            f"{key['detector_version']} [{key['config_hash'][:8]}] with the "
                            "current code (detector version or parameters changed?)")

    def examples(self, record: Any) -> tuple[np.ndarray, np.ndarray] | Exception:
        if record.model_id not in self._examples:
            try:
                x, y = load_examples(record, max_per_class=1)
                self._examples[record.model_id] = (x.numpy(), y.numpy())
            except Exception as exc:
                self._examples[record.model_id] = exc
        return self._examples[record.model_id]

    def planes(self, key: Mapping[str, str], record: Any, planes: int,
               stored_re: Any = None, headline: Headline | None = None) -> tuple[str | None, str]:
        """Model X-ray's first `planes` planes of the model, re-run with the scan's
        configuration, as base64 PNG, and a note (None + why when not drawn). stored_re: the
        scan's per-plane RE (stats re_per_plane) to check the re-run against; headline: the
        figure's title (and the predicted target the legend marks)."""
        config, detector, why = self.detector_config(key)
        if detector is None:
            return None, why
        full = int(detector.params.num_planes)
        limited = type(detector)(dataclasses.replace(detector.params,
                                                     num_planes=min(full, planes)))
        drawn, row = rerun_planes(record, limited, dataclasses.replace(config, device="auto"))
        if drawn is None:
            return None, f"re-running Model X-ray failed: {first_line(row['error'])}"
        # two planes a row: still legible when a phone shrinks the picture to its width
        png = base64.b64encode(planes_png(drawn, record.num_classes, len(drawn), headline,
                                          total=full, dpi=80, cols=2)).decode("ascii")
        shown = "plane 1" if len(drawn) == 1 else f"planes 1-{len(drawn)}"
        note = f"{shown} of the scan's {full}, re-run with its configuration"
        if isinstance(stored_re, list) and len(stored_re) >= len(drawn):
            rerun = np.array([p["re"] for p in drawn], dtype=float)
            scan = np.array(stored_re[:len(drawn)], dtype=float)
            if np.allclose(rerun, scan, rtol=PLANES_RTOL, atol=1e-9):
                note += "; per-plane RE matches the scan"
            else:
                note += (f"; per-plane RE differs from the scan (max |diff| "
                         f"{float(np.max(np.abs(rerun - scan))):.3g}): model file or examples "
                         "changed?")
        return png, note

    def triggers(self, record: Any, trojaned: bool,
                 found: Sequence[tuple[str, Mapping[str, Any]]],
                 headline: Headline | None = None) -> tuple[str | None, list[str]]:
        """One figure (base64 PNG, or None when there is nothing to draw) of the ground-truth
        trigger and the inverted ones, titled with the headline, and notes."""
        notes: list[str] = []
        x = None
        if record is not None:
            examples = self.examples(record)
            if isinstance(examples, Exception):
                notes.append(f"examples unreadable: {type(examples).__name__}: {examples}")
            else:
                x = pick_example(*examples, record, found)
        rows, more = trigger_panels(record, x, trojaned, found)
        notes += more
        if not rows:
            return None, notes
        return png_base64(panels_figure(rows, headline), dpi=80), notes


# --------------------------------------------------------------------------------------------
# `xray explain`


def _latest_run_records(out_uri: str, model_id: str) -> tuple[pd.Series, Any]:
    runs = read_runs(out_uri)
    if not len(runs):
        raise FileNotFoundError(f"no runs under {out_uri}: scan first "
                                f"(xray scan ... --out {out_uri})")
    run = runs.iloc[-1]
    where = locations.locate_manifest(run, out_uri)  # wherever the output folder is now
    records = {r.model_id: r for r in locations.read_located(where)}
    if model_id not in records:
        raise KeyError(f"model {model_id!r} is not in the manifest {where.uri}")
    return run, records[model_id]


def _best_triggers(out_uri: str, model_id: str,
                   per_detector: int) -> list[tuple[str, pd.Series]]:
    """(detector, row) of the model's inverted triggers in its newest run with any: the
    `per_detector` highest-REASR rows of each scanner."""
    rows = read_table(out_uri, "triggers", model_ids=[model_id])
    if not len(rows):
        return []
    rows = rows[rows["run_id"] == sorted(rows["run_id"])[-1]]
    found = []
    for detector, group in rows.groupby("detector", sort=True):
        best = group.sort_values(["reasr", "trigger_index"], ascending=[False, True])
        found += [(str(detector), r) for _, r in best.head(per_detector).iterrows()]
    return found


def explain_model(out_uri: str, model_id: str, png_uri: str | None = None,
                  max_planes: int = 4) -> str:
    """Model X-ray's planes of one scanned model (re-run with its latest run's parameters) as a
    PNG at png_uri (default <out>/explain/<model_id>-modelxray.png); returns its URI. Titled
    with `model_headline`; beside the planes the best inverted trigger of each scanner that
    stored triggers and, for a trojaned model, the true trigger (when the round records it)."""
    run, record = _latest_run_records(out_uri, model_id)
    config = parse_config(json.loads(run["config_json"]), source=f"run {run['run_id']}",
                          stored=True)
    specs = [d for d in config.detectors if d.name == "modelxray"]
    detector = specs[0].build() if specs else registry.build("modelxray")
    planes, row = rerun_planes(record, detector, config)
    if planes is None:
        raise ValueError(f"model {model_id}: Model X-ray failed: {row['error']}")
    headline = model_headline(out_uri, model_id, record)
    found = _best_triggers(out_uri, model_id, per_detector=1)
    panels: list[list] = []
    if found or record.poisoned:
        examples = ModelPictures(pd.DataFrame()).examples(record)
        if not isinstance(examples, Exception):
            x = pick_example(*examples, record, found)
            rows, _ = trigger_panels(record, x, bool(record.poisoned), found)
            panels = rows  # the true trigger's row first, then one row per scanner
    png_uri = png_uri or storage.join(out_uri, "explain", f"{model_id}-modelxray.png")
    storage.atomic_write_bytes(png_uri, planes_png(planes, record.num_classes, max_planes,
                                                   headline, total=len(planes), triggers=panels))
    return png_uri


def explain_triggers(out_uri: str, model_id: str, png_uri: str | None = None,
                     per_detector: int = 2) -> str | None:
    """Draw a scanned model's inverted triggers (the `triggers` table of its newest run: the
    `per_detector` highest-REASR rows of each scanner) beside the ground-truth trigger, as the
    report draws them. Returns the PNG's URI, or None when the model has no trigger rows."""
    found = _best_triggers(out_uri, model_id, per_detector)
    if not found:
        return None
    _, record = _latest_run_records(out_uri, model_id)
    pictures = ModelPictures(pd.DataFrame())
    examples = pictures.examples(record)
    if isinstance(examples, Exception):
        raise examples
    x = pick_example(*examples, record, found)
    panels, _ = trigger_panels(record, x, bool(record.poisoned), found)
    png_uri = png_uri or storage.join(out_uri, "explain", f"{model_id}-triggers.png")
    headline = model_headline(out_uri, model_id, record, first=found[0][0])
    storage.atomic_write_bytes(png_uri, png_bytes(panels_figure(panels, headline)))
    return png_uri
