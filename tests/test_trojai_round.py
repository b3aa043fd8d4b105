"""TrojAI rounds 1-4 on disk: the reader's dialects, the zoo export, pickles only with the
opt-in and only in workers."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from xray.io.manifest import ManifestError, read_manifest
from xray.io.trojai import PREPROCESSING, read_round

from _trojai_fixtures import PidPayload

R2 = {"POISONED": True, "MODEL_ARCHITECTURE": "resnet18", "NUMBER_CLASSES": 12,
      "TRIGGER_TYPE": "instagram", "TRIGGER_TYPE_OPTION": "XToasterFilter",
      "TRIGGERED_CLASSES": [1, 2], "TRIGGER_TARGET_CLASS": 7, "TRIGGERED_FRACTION": 0.2}
R3 = {**R2, "POISONED": False, "MODEL_ARCHITECTURE": "densenet121", "TRIGGER_TYPE": None,
      "TRIGGER_TARGET_CLASS": None, "ADVERSARIAL_TRAINING_METHOD": "FBF",
      "ADVERSARIAL_EPS": 0.0078}
# r4 is jsonpickle: a "py/object" naming a class that does not exist here must not matter.
R4 = {"py/object": "no_such_module.RoundConfig", "poisoned": True,
      "model_architecture": "mobilenetv2", "number_classes": 33, "trigger_organization": "one2one",
      "triggers": [{"py/object": "no_such_module.TriggerConfig", "source_class": 4,
                    "target_class": 30, "fraction": 0.1, "type": "polygon",
                    "polygon_side_count": 6, "condition": "spatial"}]}


def _folder(root: Path, name: str, config: dict | None, truth: int, examples: str) -> None:
    d = root / name
    (d / examples).mkdir(parents=True)
    (d / examples / "class_0_example_0.png").write_bytes(b"png")
    (d / examples / "class_4_example_0.png").write_bytes(b"png")
    (d / "model.pt").write_bytes(b"not read by the reader")
    (d / "ground_truth.csv").write_text(f"{truth}")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))


def test_reader_dialects_r2_r3_r4(tmp_path):
    root = tmp_path / "round4-train-dataset"
    _folder(root / "models", "id-00000000", R2, 1, "example_data")
    _folder(root / "models", "id-00000001", R3, 0, "clean_example_data")
    _folder(root / "models", "id-00000002", R4, 1, "clean_example_data")
    (root / "models" / "id-00000002" / "poisoned_example_data").mkdir()
    r2, r3, r4 = read_manifest(str(root))
    assert (r2.architecture, r2.num_classes, r2.format, r2.input_shape) == (
        "resnet18", 12, "pickle", (3, 224, 224))
    assert (r2.poisoned, r2.target, r2.attack) == (True, 7, "instagram")
    assert r2.examples_uri.endswith(os.path.join("id-00000000", "example_data"))
    assert (r3.architecture, r3.poisoned, r3.target, r3.attack) == (
        "densenet121", False, None, None)
    assert (r4.architecture, r4.num_classes, r4.target, r4.attack) == (
        "mobilenet_v2", 33, 30, "polygon")
    assert r4.examples_uri.endswith("clean_example_data")
    for r in (r2, r3, r4):
        assert r.preprocessing == {"channel_order": "RGB", "center_crop": 224, "scale": "unit"}
        assert (r.mean, r.std) == ((0.0,), (1.0,))
    # trigger facts only in ground-truth fields; tags say only round and split
    assert [r.tags for r in (r2, r3, r4)] == [
        {"trojai_round": d, "split": "train"} for d in ("r2", "r3", "r4")]


def test_reader_round1_metadata_and_errata(tmp_path):
    root = tmp_path / "round1-holdout"
    for i, truth in [(77, 1), (78, 1), (83, 0), (184, 1)]:
        _folder(root, f"id-{i:08d}", None, truth, "example_data")
    (root / "METADATA.csv").write_text(
        "model_name,model_architecture,poisoned,trigger_target_class\n"
        "id-00000077,resnet50,True,2\nid-00000078,inceptionv3,True,1\n"
        "id-00000083,densenet121,False,\nid-00000184,resnet50,True,3\n")
    records = read_round(str(root))  # split "test" inferred from "holdout"
    by_id = {r.model_id: r for r in records}
    assert sorted(by_id) == ["id-00000078", "id-00000083", "id-00000184"]  # 077: test erratum
    r = by_id["id-00000078"]
    assert (r.architecture, r.num_classes, r.poisoned, r.target, r.attack) == (
        "inception_v3", 5, True, 1, "polygon")
    assert r.preprocessing == PREPROCESSING["r1"] == {"channel_order": "BGR", "center_crop": None,
                                                      "scale": "minmax"}
    assert by_id["id-00000083"].poisoned is False  # clean: never an erratum
    train = read_round(str(root), split="train")
    assert "id-00000184" not in {r.model_id for r in train}
    assert "id-00000077" in {r.model_id for r in train}
    everything = read_round(str(root), exclude_errata=False)
    assert len(everything) == 4
    (root / "METADATA.csv").write_text("model_name,poisoned\nid-00000078,True\n")
    with pytest.raises(ManifestError, match="architecture"):
        read_round(str(root))


def test_exported_rounds_read_as_the_zoo_records(tiny_round, trojai_rounds):
    round_dir, _ = tiny_round
    zoo = read_manifest(str(round_dir))
    for dialect, folder in trojai_rounds.items():
        assert not list(folder.glob("manifest.*"))  # read as it comes, from the layout
        exported = read_manifest(str(folder))
        assert [r.format for r in exported] == ["pickle"] * len(zoo)
        same = [dataclasses.replace(e, uri=z.uri, format=z.format, examples_uri=z.examples_uri)
                for e, z in zip(exported, zoo)]
        assert same == zoo, dialect
        config = json.loads((folder / "models" / zoo[0].model_id / "config.json").read_text())
        assert ("POISONED" in config) == (dialect == "r2")
        assert ("py/object" in config) == (dialect == "r4")
        assert (folder / "METADATA.csv").is_file()


def _add_payload_model(round_dir: Path, template: str, marker: Path) -> str:
    """A model folder whose model.pt runs code when unpickled."""
    src = round_dir / "models" / template
    dst = round_dir / "models" / "id-99999999"
    shutil.copytree(src, dst)
    torch.save(PidPayload(str(marker)), dst / "model.pt")
    return "id-99999999"


def test_pickles_scan_only_with_the_opt_in_and_only_in_workers(
        tiny_scores, trojai_rounds, ray_local, tmp_path):
    from xray.config import parse_config
    from xray.results.sink import read_table
    from xray.runner import run_scan
    from _trojai_fixtures import FAST_CONFIG

    _, _, safe_rows, _ = tiny_scores
    round_dir = tmp_path / "r4"
    shutil.copytree(trojai_rounds["r4"], round_dir)
    marker = tmp_path / "payload-ran.txt"
    payload = _add_payload_model(round_dir, sorted(safe_rows)[0], marker)

    # Without the opt-in: every pickle is an error row naming the file and the flag; the
    # payload runs nowhere (neither in the driver, which only stats files, nor in a worker).
    config = parse_config(FAST_CONFIG)
    refused = tmp_path / "refused"
    run_scan(str(round_dir), str(refused), config, num_actors=1, show_progress=False)
    rows = read_table(str(refused), "scores")
    assert len(rows) == len(safe_rows) + 1 and set(rows["status"]) == {"error"}
    for _, row in rows.iterrows():
        assert f"{row['model_id']}{os.sep}model.pt" in row["error"]
        assert "--allow-pickle" in row["error"]
    assert not marker.exists()

    # With the opt-in: loaded in the worker (the payload records a pid that is not ours) and
    # scored exactly as the safe-format round.
    allowed = tmp_path / "allowed"
    run_scan(str(round_dir), str(allowed), dataclasses.replace(config, allow_pickle=True),
             num_actors=1, show_progress=False)
    rows = read_table(str(allowed), "scores").set_index("model_id")
    pids = marker.read_text().split()
    assert pids and str(os.getpid()) not in pids
    assert rows.loc[payload, "status"] == "error" and "nn.Module" in rows.loc[payload, "error"]
    for model_id, safe in safe_rows.items():
        assert rows.loc[model_id, "status"] == "ok"
        assert rows.loc[model_id, "score"] == safe["score"]
        assert json.loads(rows.loc[model_id, "stats_json"])["re"] == \
            json.loads(safe["stats_json"])["re"]


def test_r2_export_scores_like_the_safe_round(tiny_scores, trojai_rounds):
    from xray.config import parse_config
    from xray.scanning import scan_model
    from _trojai_fixtures import FAST_CONFIG

    _, _, safe_rows, _ = tiny_scores
    config = dataclasses.replace(parse_config(FAST_CONFIG), allow_pickle=True)
    detectors = [d.build() for d in config.detectors]
    records = read_manifest(str(trojai_rounds["r2"]))
    for record in records[:3]:
        row = scan_model(record, detectors, config)["scores"][0]
        assert row["status"] == "ok" and row["score"] == safe_rows[record.model_id]["score"]
