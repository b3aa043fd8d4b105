"""Export a zoo round in the TrojAI layout, as whole-module pickles (like the real rounds).

    export_trojai_round("demo-out/round", "demo-out/trojai-r4", dialect="r4", allow_pickle=True)

Writes, per model of the zoo round (read through its manifest):
    <out>/models/id-XXXXXXXX/
        model.pt                 torch.save of the network module (a pickle, as TrojAI ships)
        ground_truth.csv         0 or 1
        config.json              r2 dialect: upper-case keys (POISONED, MODEL_ARCHITECTURE,
                                 NUMBER_CLASSES, TRIGGER_TYPE, TRIGGER_TARGET_CLASS, ...);
                                 r4 dialect: lower-case jsonpickle keys ("py/object" tags,
                                 poisoned, model_architecture, number_classes, triggers = null or
                                 [{source_class, target_class, fraction, type, condition, ...}])
        example_data/            r2 (clean examples)
        clean_example_data/      r4, and poisoned_example_data/ for trojaned models
    <out>/METADATA.csv           one row per model (r4: triggers flattened to triggers_0_*)
No manifest.* is written: `xray scan --manifest <out>` reads the round as it comes.

The zoo's facts that TrojAI configs have no key for (input shape, normalisation, example
preprocessing, tags) go in an `xray` block of config.json (xray.io.trojai.XRAY_KEY), so the
round reads back as the same records as the zoo's own manifest (except uri, format and
examples_uri). Zoo attack names (badnets, polygon, ...) are written as the trigger type.
Writing pickles needs allow_pickle=True, because reading them back runs code.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Any

from xray.io import storage
from xray.io.manifest import read_manifest
from xray.io.model_loading import load_model, save_model
from xray.io.records import ModelRecord
from xray.io.trojai import CONFIG_FILE, GROUND_TRUTH_FILE, METADATA_FILE, MODEL_FILE, XRAY_KEY

DIALECTS = ("r2", "r4")


def _zoo_config(record: ModelRecord, round_uri: str) -> dict[str, Any]:
    path = storage.join(round_uri, record.model_id, CONFIG_FILE)
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError):
        return {}


def trojai_config(record: ModelRecord, zoo: dict[str, Any], dialect: str) -> dict[str, Any]:
    """config.json of one model in the r2 or r4 dialect (with the xray block)."""
    poisoned = bool(record.poisoned)
    victims = zoo.get("victims")
    rate = zoo.get("poison_rate")
    xray = {"input_shape": list(record.input_shape), "mean": list(record.mean),
            "std": list(record.std), "preprocessing": dict(record.preprocessing),
            "tags": dict(record.tags)}
    if dialect == "r2":
        return {"POISONED": poisoned, "MODEL_ARCHITECTURE": record.architecture,
                "NUMBER_CLASSES": record.num_classes,
                "TRIGGER_TYPE": record.attack if poisoned else None,
                "TRIGGER_TYPE_OPTION": None,
                "TRIGGERED_CLASSES": victims if poisoned else None,
                "TRIGGER_TARGET_CLASS": record.target if poisoned else None,
                "TRIGGERED_FRACTION": rate if poisoned else None,
                "NUMBER_TRAINING_SAMPLES": None, XRAY_KEY: xray}
    if dialect != "r4":
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")
    triggers = None
    if poisoned:
        sources = victims if victims else [None]
        triggers = [{"py/object": "trojai.datagen.config.TriggerConfig", "source_class": s,
                     "target_class": record.target, "fraction": rate, "type": record.attack,
                     "polygon_side_count": None, "color": None, "condition": "None",
                     "spatial_quadrant": None, "instagram_filter_type": None}
                    for s in sources[:1]]
    return {"py/object": "round_config.RoundConfig", "poisoned": poisoned,
            "model_architecture": record.architecture, "number_classes": record.num_classes,
            "number_example_images": None, "adversarial_training_method": None,
            "trigger_organization": "one2one" if poisoned else None, "triggers": triggers,
            XRAY_KEY: xray}


def _metadata_row(record: ModelRecord, config: dict[str, Any], dialect: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model_name": record.model_id}
    for key, value in config.items():
        if key in (XRAY_KEY, "py/object"):
            continue
        if key == "triggers":
            for i, t in enumerate(value or []):
                for tk, tv in t.items():
                    if tk != "py/object":
                        row[f"triggers_{i}_{tk}"] = tv
            continue
        row[key.lower() if dialect == "r2" else key] = json.dumps(value) \
            if isinstance(value, (list, dict)) else value
    return row


def _copy_tree(src: str, dst: str) -> None:
    for name in storage.listdir(src):
        storage.atomic_write_bytes(storage.join(dst, name),
                                   storage.read_bytes(storage.join(src, name)))


def export_trojai_round(round_uri: str, out_uri: str, *, dialect: str = "r4",
                        allow_pickle: bool = False, under_models: bool = True) -> list[str]:
    """Write the zoo round `round_uri` in the TrojAI layout under `out_uri` (see the module
    docstring); returns the model folders written. Needs allow_pickle=True (pickles)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")
    if not allow_pickle:
        raise ValueError("exporting writes whole-module pickles (model.pt), which run code when "
                         "loaded; pass allow_pickle=True")
    records = read_manifest(round_uri)
    base = storage.join(out_uri, "models") if under_models else out_uri
    rows, written = [], []
    for record in records:
        folder = storage.join(base, record.model_id)
        net = load_model(record)  # the safe format: nothing here runs code from the file
        save_model(net, storage.join(folder, MODEL_FILE), "pickle", allow_pickle=True)
        storage.write_text(storage.join(folder, GROUND_TRUTH_FILE),
                           f"{int(bool(record.poisoned))}\n")
        examples = "example_data" if dialect == "r2" else "clean_example_data"
        if record.examples_uri:
            _copy_tree(record.examples_uri, storage.join(folder, examples))
            parent = (posixpath.dirname(record.examples_uri.rstrip("/"))
                      if "://" in record.examples_uri
                      else os.path.dirname(record.examples_uri.rstrip(os.sep)))
            poisoned_dir = storage.join(parent, "poisoned_example_data")
            if dialect == "r4" and record.poisoned and storage.exists(poisoned_dir):
                _copy_tree(poisoned_dir, storage.join(folder, "poisoned_example_data"))
        config = trojai_config(record, _zoo_config(record, round_uri), dialect)
        storage.write_text(storage.join(folder, CONFIG_FILE), json.dumps(config, indent=2))
        rows.append(_metadata_row(record, config, dialect))
        written.append(folder)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(out_uri, METADATA_FILE), buf.getvalue())
    return written

