"""`timm:<name>` architectures: built offline by timm (an optional extra), weights from the
user's file under the same safety rules, scanned like any other model."""
from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from xray import models
from xray.config import parse_config
from xray.io import rows
from xray.io.manifest import ManifestError, read_manifest
from xray.io.model_loading import Normalized, PickleNotAllowedError, load_model, save_model
from xray.scanning import scan_model

ARCH = "timm:mobilenetv3_small_050"  # 0.6 M parameters; any input size
SHAPE, CLASSES, MEAN, STD = (3, 32, 32), 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _write_examples(folder, per_class: int = 3) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (SHAPE[1], SHAPE[2], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{c}_example_{i}.png")


def _write_manifest(path, **row) -> str:
    fields = {"model_id": "m0", "uri": "model.safetensors", "format": "safetensors",
              "architecture": ARCH, "num_classes": CLASSES, "input_shape": "3x32x32",
              "mean": json.dumps(list(MEAN)), "std": json.dumps(list(STD)),
              "examples_uri": "examples", **row}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerow(fields)
    return str(path)


@pytest.fixture(scope="module")
def timm_net():
    pytest.importorskip("timm", reason="the timm extra: pip install 'xray[timm]'")
    torch.manual_seed(0)
    return models.create(ARCH, CLASSES, SHAPE).eval()


@pytest.mark.parametrize("fmt,file", [("safetensors", "model.safetensors"),
                                      ("state_dict", "model.pt")])
def test_manifest_row_loads_the_same_network_and_scans(timm_net, tmp_path, fmt, file):
    save_model(timm_net, str(tmp_path / file), fmt)
    _write_examples(tmp_path / "examples")
    (record,) = read_manifest(_write_manifest(tmp_path / "manifest.csv", uri=file, format=fmt))
    assert record.architecture == ARCH

    loaded = load_model(record)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = Normalized(timm_net, MEAN, STD).eval()(x)
        assert torch.equal(loaded(x), expected)

    config = parse_config({"seed": 0, "detectors": {"modelxray": {"preset": "small"}}})
    (row,) = scan_model(record, [d.build() for d in config.detectors], config)["scores"]
    assert row["status"] == "ok", row["error"]
    assert row["architecture"] == ARCH and math.isfinite(row["score"])


def test_pickle_rule_is_the_same_for_timm_rows(timm_net, tmp_path):
    save_model(timm_net, str(tmp_path / "model.pt"), "pickle", allow_pickle=True)
    (record,) = read_manifest(_write_manifest(tmp_path / "manifest.csv", uri="model.pt",
                                              format="pickle", examples_uri=""))
    with pytest.raises(PickleNotAllowedError, match="allow_pickle"):
        load_model(record)


def test_weights_of_another_timm_model_do_not_fit(timm_net, tmp_path):
    save_model(timm_net, str(tmp_path / "model.safetensors"), "safetensors")
    (record,) = read_manifest(_write_manifest(tmp_path / "manifest.csv",
                                              architecture="timm:resnet10t"))
    with pytest.raises(ValueError, match="weights do not fit timm:resnet10t"):
        load_model(record)


def test_unknown_and_hub_names_are_refused_with_a_suggestion(timm_net, tmp_path):
    with pytest.raises(ManifestError, match="unknown timm model 'resnet10x'; did you mean "
                                            "'resnet10t'"):
        read_manifest(_write_manifest(tmp_path / "manifest.csv", architecture="timm:resnet10x"))
    assert models.is_known("timm:resnet10t") and models.is_known("timm:resnet10t.c3_in1k")
    # a hub name would fetch a config from the network even without pretrained weights
    for name in ("timm:hf-hub:timm/resnet10t.c3_in1k", "timm:local-dir:/tmp"):
        assert not models.is_known(name)
        with pytest.raises(KeyError, match="unknown timm model"):
            models.create(name, CLASSES, SHAPE)
    assert "timm:resnet10t" in models.available("timm:resnet1*")


def test_input_channels_and_fixed_input_sizes(timm_net):
    grey = models.create("timm:resnet10t", 3, (1, 28, 28)).eval()
    vit = models.create("timm:vit_tiny_patch16_224", 3, (3, 32, 32)).eval()  # img_size=(32, 32)
    with torch.no_grad():
        assert grey(torch.rand(2, 1, 28, 28)).shape == (2, 3)
        assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_without_timm_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    monkeypatch.setattr(rows, "_ARCHITECTURE_PROBLEMS", {})
    with pytest.raises(ImportError, match=r"pip install 'xray\[timm\]'"):
        models.create("timm:resnet10t", CLASSES, SHAPE)
    assert not models.is_known("timm:resnet10t")
    assert models.is_known("resnet18") and "torchvision:resnet18" in models.available()
    with pytest.raises(ManifestError, match=r"field 'architecture'.*timm.*pip install "
                                            r"'xray\[timm\]'"):
        read_manifest(_write_manifest(tmp_path / "manifest.csv"))
