"""MNTD: meta-classifier trained on a (stacked) shadow round, artifact, detector, CLI, runner."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from xray import detectors, models
from xray.cli import main
from xray.detectors.base import ScanContext, ScanData
from xray.detectors.mntd import META_FILE, WEIGHTS_FILE, load_artifact
from xray.io.examples import load_examples
from xray.io.model_loading import Normalized, load_model

from _mntd_fixtures import SHADOW_RECIPE



def test_artifact_beside_the_shadow_round(tiny_shadow, tiny_meta):
    round_dir, _ = tiny_shadow
    art = round_dir / "mntd_meta"
    assert tiny_meta.artifact_uri == str(art)
    assert (art / WEIGHTS_FILE).is_file() and (art / META_FILE).is_file()
    info = json.loads((art / META_FILE).read_text())
    assert info["key"] == {"input_shape": [3, 24, 24], "num_classes": 5, "mean": [0.0],
                           "std": [1.0]}
    n_val = sum(g["count"] for g in SHADOW_RECIPE["groups"] if g.get("split") == "validation")
    assert (tiny_meta.n_train, tiny_meta.n_val) == (24 - n_val, n_val)  # split from the recipe
    assert len(info["val_auc"][0]) == 10 and info["best"]["val_auc"] == max(info["val_auc"][0])
    loaded = load_artifact(str(art / META_FILE))
    assert loaded.meta.queries.shape == (10, 3, 24, 24) and loaded.meta.fc.in_features == 50
    assert loaded.info["query_tuning"] is True


def _scan_round(det, records):
    out = []
    for record in records:
        x, y = load_examples(record)
        res = det.score(load_model(record), ScanData(x=x, y=y, num_classes=record.num_classes),
                        ScanContext(seed=0))
        out.append((int(record.poisoned), res.score, res.stats))
    return out


def test_scores_a_separately_built_round(tiny_meta, tiny_round):
    """Shadow set: jumbo trojans, data seed 21, recipe seed 11; test round: BadNets, data seed
    3, recipe seed 5. Every model gets a probability, deterministically; the ROC-AUC is printed.
    No AUC floor: at this test budget (16 training shadow models whose jumbo trojans mostly do
    not take) the meta-classifier does not separate the tiny round (measured AUC 0.33 on 7
    models); see the issue note."""
    _, result = tiny_round
    det = detectors.build("mntd", {"artifact": tiny_meta.artifact_uri})
    rows = _scan_round(det, result.records)
    labels, scores = [r[0] for r in rows], [r[1] for r in rows]
    auc = roc_auc_score(labels, scores)
    print("mntd tiny round AUC", auc, "scores", [round(s, 3) for s in scores], labels)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert rows[0][2]["artifact_digest"] and rows[0][2]["normalisation_matches"]
    assert [r[1] for r in _scan_round(det, result.records[:2])] == scores[:2]  # deterministic


def test_mismatched_model_is_a_clear_error(tiny_meta):
    det = detectors.build("mntd", {"artifact": tiny_meta.artifact_uri})
    x = torch.rand(4, 3, 24, 24)
    for classes, shape in [(10, (3, 24, 24)), (5, (3, 32, 32)), (5, (1, 24, 24))]:
        net = Normalized(models.create("mntd_mnist_cnn", classes, shape)).eval()
        data = ScanData(x=torch.rand(4, *shape), y=torch.zeros(4, dtype=torch.int64),
                        num_classes=classes)
        with pytest.raises(ValueError, match="trained for input shape"):
            det.score(net, data, ScanContext())
    # same shape and classes, another normalisation: scored, and recorded as a mismatch
    net = Normalized(models.create("mntd_mnist_cnn", 5, (3, 24, 24)), (0.5,), (0.25,)).eval()
    res = det.score(net, ScanData(x=x, y=torch.zeros(4, dtype=torch.int64), num_classes=5,
                                  mean=(0.5,), std=(0.25,)), ScanContext())
    assert res.stats["normalisation_matches"] is False and np.isfinite(res.score)


def test_missing_artifact_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="xray mntd train"):
        detectors.build("mntd", {"artifact": str(tmp_path / "nothing")})
    det = detectors.build("mntd")
    with pytest.raises(ValueError, match="needs params.artifact"):
        det.score(Normalized(models.create("mntd_mnist_cnn", 5, (3, 24, 24))),
                  ScanData(x=torch.rand(2, 3, 24, 24), y=torch.zeros(2, dtype=torch.int64),
                           num_classes=5), ScanContext())


def test_cli_mntd_train(tiny_shadow, tmp_path):
    round_dir, _ = tiny_shadow
    out = tmp_path / "meta"
    res = CliRunner().invoke(main, ["mntd", "train", "--shadow", str(round_dir), "--out",
                                    str(out), "--epochs", "1", "--no-query-tuning", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "validation AUC" in res.output
    info = json.loads((out / META_FILE).read_text())
    assert info["query_tuning"] is False and len(info["val_auc"][0]) == 1
    bad = CliRunner().invoke(main, ["mntd", "train", "--shadow", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output


def test_scan_runs_mntd_and_mmbd_through_the_runner(tiny_round, tiny_meta, ray_local, tmp_path):
    from xray.results.sink import read_table

    round_dir, result = tiny_round
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"detectors": {
        "mntd": {"params": {"artifact": tiny_meta.artifact_uri}},
        "mmbd": {"preset": "small"}}}))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["scan", "--manifest", str(round_dir / "manifest.csv"),
                                    "--out", str(out), "--detectors", "mntd,mmbd", "--config",
                                    str(config), "--quiet"])
    assert res.exit_code == 0, res.output
    scores = read_table(str(out), "scores")
    assert set(scores["detector"]) == {"mntd", "mmbd"}
    assert len(scores) == 2 * len(result.records)
    assert (scores["status"] == "ok").all(), scores["error"].dropna().tolist()
    mmbd = scores[scores["detector"] == "mmbd"]
    stats = [json.loads(s) for s in mmbd["stats_json"]]
    assert all(len(s["margins"]) == 5 and 0 <= s["p_value"] <= 1 for s in stats)
