"""`xray explain`: the picture of one scanned model (Model X-ray's decision-boundary planes).

Re-runs Model X-ray on that model with the parameters its run used (same seed, same planes) and
draws the planes; the scores table is not touched.
"""
from __future__ import annotations

import io
import json

from xray import detectors as registry
from xray.config import parse_config
from xray.io import storage
from xray.io.manifest import read_manifest
from xray.results.sink import read_table
from xray.scan import scan_model


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
