"""A round written to s3:// (moto on 127.0.0.1) reads back through the manifest reader."""
import io

import pandas as pd

from xray.io import storage
from xray.io.examples import load_examples
from xray.io.manifest import read_manifest
from xray.io.model_loading import load_model
from xray.zoo.build import build_round
from xray.zoo.recipe import parse_recipe

S3_RECIPE = {
    "name": "s3-tiny", "seed": 1,
    "dataset": {"name": "signs", "params": {"num_classes": 4, "image_size": 16,
                                            "n_train_per_class": 40, "n_test_per_class": 10}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "small", "epochs": 1},
    "asr_floor": 0.0,  # storage is under test here, not training quality
    "examples_per_class": 2, "poisoned_examples_per_class": 1,
    "groups": [{"count": 1}, {"count": 1, "attack": "badnets"}],
}


def test_round_written_to_s3_reads_back(s3_server):
    round_uri = f"s3://{s3_server.bucket}/rounds/tiny"
    result = build_round(parse_recipe(S3_RECIPE), round_uri, workers=1, show_progress=False)
    assert len(result.records) == 2
    assert {"METADATA.csv", "manifest.csv", "id-00000000", "id-00000001"} <= set(
        storage.listdir(round_uri))
    records = read_manifest(storage.join(round_uri, "manifest.csv"))
    assert [r.model_id for r in records] == ["id-00000000", "id-00000001"]
    assert all(r.uri.startswith("s3://") for r in records)
    assert [r.poisoned for r in records] == [False, True]
    net = load_model(records[1])
    x, y = load_examples(records[1])
    assert x.shape == (8, 3, 16, 16) and net(x).shape == (8, 4)
    metadata = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(round_uri, "METADATA.csv"))))
    assert list(metadata["model_id"]) == ["id-00000000", "id-00000001"]
    # Re-running against object storage skips what is there.
    again = build_round(parse_recipe(S3_RECIPE), round_uri, workers=1, show_progress=False)
    assert again.trained == 0 and again.skipped == 2
    # A build stopped before a model was started resumes, and indexes that model too (a worker
    # writes its folder after the driver's first listing of the round).
    fs, path = storage.filesystem(storage.join(round_uri, "id-00000001"))
    fs.rm(path, recursive=True)
    resumed = build_round(parse_recipe(S3_RECIPE), round_uri, workers=1, show_progress=False)
    assert resumed.trained == 1 and resumed.skipped == 1
    assert [r.model_id for r in resumed.records] == ["id-00000000", "id-00000001"]
    assert [r.model_id for r in read_manifest(storage.join(round_uri, "manifest.csv"))] == [
        "id-00000000", "id-00000001"]


def test_scan_from_s3_with_outputs_on_s3(s3_server, ray_local):
    """Round, manifest, models, examples and result tables all on the S3 server."""
    from xray.config import parse_config
    from xray.runner import run_scan

    round_uri = f"s3://{s3_server.bucket}/rounds/scan"
    build_round(parse_recipe({**S3_RECIPE, "name": "s3-scan"}), round_uri, workers=1,
                show_progress=False)
    out = f"s3://{s3_server.bucket}/scans/run1"
    config = parse_config({"detectors": {"modelxray": {"preset": "small"}}})
    summary = run_scan(storage.join(round_uri, "manifest.csv"), out, config, show_progress=False)
    assert summary.models_scanned == 2
    scores = pd.read_parquet(
        f"{out}/scores", storage_options={"client_kwargs": {"endpoint_url": s3_server.endpoint}})
    assert sorted(scores["model_id"]) == ["id-00000000", "id-00000001"]
    assert (scores["status"] == "ok").all(), scores["error"].tolist()
    # Nothing temporary is left behind on the object store.
    fs, path = storage.filesystem(out)
    assert not [p for p in fs.find(path) if "/." in p]


def test_transient_errors_are_the_ones_that_may_pass():
    """Network failures and the OSErrors s3fs raises for 5xx / throttling answers are retried
    (and make a `retryable` row); answers about the file (missing, forbidden, not an image)
    are final."""
    import errno

    from PIL import UnidentifiedImageError

    from xray.io.storage import is_transient

    for err in (ConnectionRefusedError(), TimeoutError(), OSError(errno.EBUSY, "SlowDown"),
                OSError(errno.EIO, "InternalError"), ConnectionResetError()):
        assert is_transient(err), err
    for err in (FileNotFoundError(), PermissionError(), UnidentifiedImageError("not a PNG"),
                OSError("no errno"), ValueError("bad"), IsADirectoryError()):
        assert not is_transient(err), err
