"""`xray explain`: the picture of one scanned model (Model X-ray's decision-boundary planes), and
its inverted triggers (NC / ABS / K-Arm rows of the `triggers` table: mask, pattern, a stamped
example) beside the ground-truth trigger when the round's config.json has one.

Re-runs Model X-ray on that model with the parameters its run used (same seed, same planes) and
draws the planes; the scores table is not touched.
"""
from __future__ import annotations

import io
import json

import torch

from xray import detectors as registry
from xray.config import parse_config
from xray.io import storage
from xray.io.manifest import read_manifest
from xray.results.sink import read_table
from xray.scan import scan_model
from xray.zoo.round import trigger_config


def explain_model(out_uri: str, model_id: str, png_uri: str | None = None,
                  max_planes: int = 4) -> str:
    from xray.detectors.modelxray import plot_planes

    runs = read_table(out_uri, "runs")
    if not len(runs):
        raise FileNotFoundError(f"no runs under {out_uri}: scan first (xray scan ... --out {out_uri})")
    run = runs.sort_values("started_at").iloc[-1]
    config = parse_config(json.loads(run["config_json"]), source=f"run {run['run_id']}")
    records = {r.model_id: r for r in read_manifest(run["manifest_uri"])}
    if model_id not in records:
        raise KeyError(f"model {model_id!r} is not in the manifest {run['manifest_uri']}")
    specs = [d for d in config.detectors if d.name == "modelxray"]
    detector = specs[0].build() if specs else registry.build("modelxray")
    result = scan_model(records[model_id], [detector], config, keep_artifacts=True)
    row = result["scores"][0]
    if row["status"] != "ok":
        raise ValueError(f"model {model_id}: Model X-ray failed: {row['error']}")
    planes = result["artifacts"]["modelxray"]["planes"]
    png_uri = png_uri or storage.join(out_uri, "explain", f"{model_id}-modelxray.png")
    buf = io.BytesIO()
    plot_planes(planes, records[model_id].num_classes, buf, max_planes=max_planes)
    storage.atomic_write_bytes(png_uri, buf.getvalue())
    return png_uri


# ------------------------------------------------------------------ inverted triggers


def plot_triggers(candidates, example, truth, out, titles=None) -> None:
    """One row per inverted trigger: mask (or kernel), pattern, stamped example; a first row
    with the clean example, the ground-truth stamped example and its change, when known.
    example: (C, H, W) pixels; truth: stamped example (C, H, W) or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def show(ax, img, title):
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
            arr = arr[..., 0] if arr.shape[-1] == 1 else arr
        ax.imshow(np.clip(arr, 0, 1), cmap="gray" if arr.ndim == 2 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")

    rows = len(candidates) + (1 if truth is not None else 0)
    fig, axes = plt.subplots(max(rows, 1), 3, figsize=(6, 2 * max(rows, 1)), squeeze=False)
    r = 0
    if truth is not None:
        show(axes[0, 0], example, "clean example")
        show(axes[0, 1], truth, "ground-truth trigger")
        change = np.abs(np.asarray(truth) - np.asarray(example)).max(0)
        show(axes[0, 2], change / max(float(change.max()), 1e-6), "ground-truth change")
        r = 1
    for i, cand in enumerate(candidates):
        label = (titles[i] if titles else "") + f" {cand.victim}->{cand.target} " \
            f"REASR {cand.reasr:.2f}"
        stamped = cand.apply(torch.as_tensor(example)[None])[0].numpy()
        if cand.kind == "patch":
            show(axes[r + i, 0], cand.mask.numpy(), label + " mask")
            pattern = cand.pattern.expand(-1, *example.shape[1:]).numpy()
            show(axes[r + i, 1], pattern, "pattern")
        else:
            k = cand.kernel.numpy()
            axes[r + i, 0].imshow(k, cmap="viridis", aspect="auto")
            axes[r + i, 0].set_title(label + " kernel", fontsize=7)
            axes[r + i, 0].axis("off")
            axes[r + i, 1].axis("off")
        show(axes[r + i, 2], stamped, "stamped example")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)


def explain_triggers(out_uri: str, model_id: str, png_uri: str | None = None,
                     per_detector: int = 2) -> str | None:
    """Draw a scanned model's inverted triggers (the `triggers` table: the `per_detector`
    highest-REASR rows of each scanner) beside the ground-truth trigger when the round's
    config.json has one. Returns the PNG's URI, or None when the model has no trigger rows."""
    from xray.detectors.inversion.core import TriggerCandidate
    from xray.io.examples import load_examples

    triggers = read_table(out_uri, "triggers")
    rows = triggers[triggers["model_id"] == model_id] if len(triggers) else triggers
    if not len(rows):
        return None
    runs = read_table(out_uri, "runs")
    run = runs.sort_values("started_at").iloc[-1]
    records = {r.model_id: r for r in read_manifest(run["manifest_uri"])}
    if model_id not in records:
        raise KeyError(f"model {model_id!r} is not in the manifest {run['manifest_uri']}")
    record = records[model_id]
    rows = rows[rows["run_id"] == rows.sort_values("run_id")["run_id"].iloc[-1]] \
        if rows["run_id"].nunique() > 1 else rows
    chosen, titles = [], []
    for detector, group in rows.groupby("detector", sort=True):
        for _, row in group.sort_values("reasr", ascending=False).head(per_detector).iterrows():
            chosen.append(TriggerCandidate.from_row(row.to_dict()))
            titles.append(str(detector))
    x, y = load_examples(record, max_per_class=1)
    target = chosen[0].target
    pick = int(torch.nonzero(y != target).flatten()[0]) if bool((y != target).any()) else 0
    example = x[pick]
    truth = None
    gt = trigger_config(record.uri)
    if gt is not None:
        try:
            from xray.zoo.attacks import attack_from_config

            attack = attack_from_config(gt)
            truth = attack.apply(example[None].numpy())[0]
        except Exception:  # an attack this build cannot rebuild: draw the inverted ones only
            truth = None
    png_uri = png_uri or storage.join(out_uri, "explain", f"{model_id}-triggers.png")
    buf = io.BytesIO()
    plot_triggers(chosen, example.numpy(), truth, buf, titles)
    storage.atomic_write_bytes(png_uri, buf.getvalue())
    return png_uri
