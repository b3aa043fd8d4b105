"""Manifests: round trips in every format, row/field-located errors, round directories, S3."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
from pathlib import Path

import pytest

from xray.io import storage
from xray.io.manifest import (ManifestError, manifest_digest, read_manifest, read_round_dir,
                              write_manifest)
from xray.io.records import ModelRecord

FORMATS = ["csv", "jsonl", "parquet", "yaml"]
EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"


def sample_records(base: str) -> list[ModelRecord]:
    return [
        ModelRecord("m0", f"{base}/m0.safetensors", "safetensors", "mntd_mnist_cnn", 10,
                    (1, 28, 28)),
        ModelRecord("id-00000001", f"{base}/id-00000001/model.pt", "pickle", "resnet18", 5,
                    (3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    examples_uri=f"{base}/id-00000001/clean_example_data", poisoned=True,
                    target=3, attack="polygon", tags={"round": "4", "split": "train"},
                    preprocessing={"channel_order": "BGR", "center_crop": 224,
                                   "scale": "minmax"}),
        ModelRecord("m2", "s3://elsewhere/m2.pt", "state_dict", "torchvision:resnet18", 7,
                    (3, 32, 32), mean=(0.1,), std=(0.3,), poisoned=False,
                    tags={"note": "a, \"quoted\" value"}),
        ModelRecord("m3", f"{base}/m3.ts", "torchscript", "preact_resnet18", 10, (3, 32, 32),
                    poisoned=True, target=0, attack="badnets"),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_exact(tmp_path, fmt):
    records = sample_records(str(tmp_path / "models"))
    uri = str(tmp_path / f"manifest.{fmt}")
    write_manifest(records, uri)
    assert read_manifest(uri) == records


@pytest.mark.parametrize("fmt", FORMATS)
def test_relative_uris_resolve_against_the_manifest(tmp_path, fmt):
    records = sample_records(str(tmp_path / "round" / "models"))
    uri = str(tmp_path / "round" / f"manifest.{fmt}")
    write_manifest(records, uri, relative=True)
    raw = storage.read_bytes(uri)
    if fmt != "parquet":
        assert str(tmp_path) not in raw.decode()  # written relative ...
    assert read_manifest(uri) == records  # ... and read back absolute


def test_csv_accepts_the_alternative_spellings(tmp_path):
    (tmp_path / "sub").mkdir()
    text = ("model_id,uri,format,architecture,num_classes,input_shape,mean,std,poisoned,"
            "target,tag.round,tag.split,examples_uri\n"
            "a,models/a.pt,state_dict,nin,10,\"[3, 32, 32]\",0.4914;0.4822;0.4465,0.2,1,2,"
            "7,train,ex/a\n"
            "b,/abs/b.pt,safetensors,nin,10, 3X32X32 ,,,no,,7,,\n")
    (tmp_path / "sub" / "m.csv").write_text(text)
    a, b = read_manifest(str(tmp_path / "sub" / "m.csv"))
    assert a.uri == str(tmp_path / "sub" / "models" / "a.pt")
    assert a.examples_uri == str(tmp_path / "sub" / "ex" / "a")
    assert a.input_shape == (3, 32, 32) and b.input_shape == (3, 32, 32)
    assert a.mean == (0.4914, 0.4822, 0.4465) and a.std == (0.2,)
    assert (a.poisoned, a.target, b.poisoned, b.target) == (True, 2, False, None)
    assert a.tags == {"round": "7", "split": "train"} and b.tags == {"round": "7"}
    assert (b.uri, b.mean, b.std, b.examples_uri) == ("/abs/b.pt", (0.0,), (1.0,), None)


def test_yaml_list_and_mapping_forms(tmp_path):
    row = {"model_id": "a", "uri": "s3://b/a.pt", "format": "state_dict",
           "architecture": "nin", "num_classes": 10, "input_shape": "3x32x32",
           "tags": {"round": 3}}
    import yaml
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([row]))
    (tmp_path / "map.yml").write_text(yaml.safe_dump({"models": [row]}))
    first = read_manifest(str(tmp_path / "list.yaml"))
    assert first == read_manifest(str(tmp_path / "map.yml"))
    assert first[0].tags == {"round": "3"}


# ---- errors: each bad row kind names file, row and field ------------------------------------

GOOD = {"model_id": "m", "uri": "m.pt", "format": "state_dict", "architecture": "nin",
        "num_classes": 10, "input_shape": "3x32x32"}

BAD_ROWS = [  # (change to the third row, field, words in the message)
    ({"architecture": None}, "architecture", "missing required field"),
    ({"uri": ""}, "uri", "missing required field"),
    ({"num_classes": "ten"}, "num_classes", "expected an integer, got 'ten'"),
    ({"num_classes": 0}, "num_classes", "positive"),
    ({"num_classes": -3}, "num_classes", "positive"),
    ({"architecture": "resnet9000"}, "architecture", "unknown architecture 'resnet9000'"),
    ({"format": "onnx"}, "format", "unknown format 'onnx'"),
    ({"input_shape": "3x32"}, "input_shape", "C x H x W"),
    ({"input_shape": "[3, 0, 32]"}, "input_shape", "C x H x W"),
    ({"input_shape": "threexthirty"}, "input_shape", "C x H x W"),
    ({"mean": "[0.5, 0.5]"}, "mean", "1 or 3 values"),
    ({"std": "0"}, "std", "positive"),
    ({"poisoned": "maybe"}, "poisoned", "true or false"),
    ({"target": 10}, "target", "[0, 10)"),
    ({"tags": "[1, 2"}, "tags", "invalid JSON"),
    ({"preprocessing": '{"scale": "zscore"}'}, "preprocessing", "scale"),
    ({"model_id": "m1"}, "model_id", "duplicate model_id 'm1' (also in row 2)"),
    ({"num_class": 10}, "num_class", "unknown"),
]


def _write_rows(path: Path, fmt: str, rows: list[dict]) -> str:
    if fmt == "csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        path.write_text(buf.getvalue())
    else:
        path.write_text("".join(json.dumps(r) + "\n\n" for r in rows))  # blank lines don't count
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("change,field,words", BAD_ROWS,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_ROWS)])
def test_bad_row_names_file_row_and_field(tmp_path, fmt, change, field, words):
    rows = [{**GOOD, "model_id": f"m{i}"} for i in range(3)]
    rows[2] = {k: v for k, v in {**rows[2], **change}.items() if v is not None}
    uri = _write_rows(tmp_path / f"manifest.{fmt}", fmt, rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(uri)
    err = info.value
    row = None if (fmt, words) == ("csv", "unknown") else 3  # a CSV header has no row
    assert (err.file, err.row, err.field) == (uri, row, field)
    where = f"row {row} field '{field}'" if row else f"field '{field}'"
    assert f"manifest.{fmt} {where}: " in str(err)
    assert words in str(err)


def test_error_text_example(tmp_path):
    rows = [{**GOOD, "model_id": f"m{i}"} for i in range(3)]
    rows[2]["num_classes"] = "ten"
    uri = _write_rows(tmp_path / "manifest.csv", "csv", rows)
    with pytest.raises(ManifestError, match="manifest.csv row 3 field 'num_classes': "
                                            "expected an integer, got 'ten'$") as info:
        read_manifest(uri)
    copy = pickle.loads(pickle.dumps(info.value))  # errors travel back from Ray workers
    assert (str(copy), copy.row, copy.field) == (str(info.value), 3, "num_classes")


def test_errors_in_parquet_and_yaml_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rows = [{**GOOD, "model_id": f"m{i}"} for i in range(2)] + [{**GOOD, "model_id": "m0"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path / "m.parquet"))
    assert (info.value.row, info.value.field) == (3, "model_id")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"models": [GOOD, {**GOOD, "model_id": 7}]}))
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path / "m.yaml"))
    assert (info.value.row, info.value.field) == (2, "model_id")
    assert "expected a string, got 7" in str(info.value)


def test_unknown_manifest_type(tmp_path):
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="unknown manifest type"):
        read_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(ManifestError, match="unknown manifest type"):
        write_manifest([], str(tmp_path / "m.txt"))


def test_check_uris_names_the_missing_file(tmp_path):
    (tmp_path / "m0.pt").write_bytes(b"x")
    rows = [{**GOOD, "model_id": "m0", "uri": "m0.pt"},
            {**GOOD, "model_id": "m1", "uri": "gone.pt"}]
    uri = _write_rows(tmp_path / "manifest.csv", "csv", rows)
    assert len(read_manifest(uri)) == 2  # not checked by default
    with pytest.raises(ManifestError) as info:
        read_manifest(uri, check_uris=True)
    assert (info.value.row, info.value.field) == (2, "uri")
    assert "gone.pt does not exist" in str(info.value)


def test_digest_is_order_independent_and_content_sensitive():
    records = sample_records("/x")
    digest = manifest_digest(records)
    assert len(digest) == 64
    assert manifest_digest(list(reversed(records))) == digest
    changed = records[:1] + [ModelRecord(**{**records[1].__dict__, "num_classes": 6})] + records[2:]
    assert manifest_digest(changed) != digest


def test_example_manifests_agree():
    found = sorted(p.name for p in EXAMPLES.glob("manifest.*"))
    assert found == ["manifest.csv", "manifest.jsonl", "manifest.parquet", "manifest.yaml"]
    first, *rest = [read_manifest(str(EXAMPLES / name)) for name in found]
    assert len(first) >= 2 and all(r == first for r in rest)


# ---- round directories ------------------------------------------------------------------------

def _model_dir(root: Path, name: str, config: dict | None, truth: int | None = None,
               examples: str | None = "clean_example_data") -> Path:
    d = root / name
    (d / (examples or "other")).mkdir(parents=True)
    (d / "model.pt").write_bytes(b"weights")
    if truth is not None:
        (d / "ground_truth.csv").write_text(f"{truth}\n")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


ZOO_CONFIG = {"model_id": "id-00000000", "architecture": "preact_resnet18", "num_classes": 10,
              "input_shape": [3, 32, 32], "mean": [0.0], "std": [1.0], "format": "safetensors",
              "weights": "model.safetensors", "poisoned": True, "target": 2, "attack": "badnets",
              "victims": None, "trigger": {"kind": "patch"}, "asr": 0.97,
              "tags": {"dataset": "cifar10", "round": "mini"}}

R4_CONFIG = {"py/object": "round_config.RoundConfig", "poisoned": True,
             "model_architecture": "shufflenet1_5", "number_classes": 20,
             "trigger_organization": "one2one",
             "triggers": [{"py/object": "trigger_config.TriggerConfig", "source_class": 4,
                           "target_class": 11, "type": "polygon", "condition": "None"}]}

R2_CONFIG = {"POISONED": False, "MODEL_ARCHITECTURE": "wideresnet50", "NUMBER_CLASSES": 12,
             "TRIGGER_TYPE": None, "TRIGGER_TARGET_CLASS": None}


@pytest.mark.parametrize("under_models", [False, True])
def test_round_dir_reads_complete_model_folders(tmp_path, under_models):
    root = tmp_path / "round"
    models_dir = root / "models" if under_models else root
    _model_dir(models_dir, "id-00000000", ZOO_CONFIG, truth=1)
    _model_dir(models_dir, "id-00000001", R4_CONFIG, truth=1)
    _model_dir(models_dir, "id-00000002", R2_CONFIG, truth=0, examples="example_data")
    _model_dir(models_dir, "id-00000003", None, truth=0)  # half written: no config.json
    (root / "METADATA.csv").write_text("model_name\n")

    zoo, r4, r2 = read_manifest(str(root))
    assert read_round_dir(str(root)) == [zoo, r4, r2]
    base = str(models_dir)
    assert zoo == ModelRecord(
        "id-00000000", os.path.join(base, "id-00000000", "model.safetensors"), "safetensors",
        "preact_resnet18", 10, (3, 32, 32),
        examples_uri=os.path.join(base, "id-00000000", "clean_example_data"), poisoned=True,
        target=2, attack="badnets", tags={"dataset": "cifar10", "round": "mini"})
    assert (r4.model_id, r4.uri, r4.format) == (
        "id-00000001", os.path.join(base, "id-00000001", "model.pt"), "pickle")
    assert (r4.architecture, r4.num_classes, r4.input_shape) == ("shufflenet_v2_x1_5", 20,
                                                                (3, 224, 224))
    assert (r4.poisoned, r4.target, r4.attack) == (True, 11, "polygon")
    assert r4.preprocessing == {"channel_order": "RGB", "center_crop": 224, "scale": "unit"}
    assert (r2.architecture, r2.num_classes, r2.poisoned, r2.target) == (
        "wide_resnet50_2", 12, False, None)
    assert r2.examples_uri == os.path.join(base, "id-00000002", "example_data")


def test_round_dir_prefers_its_manifest(tmp_path):
    _model_dir(tmp_path, "id-00000000", ZOO_CONFIG)
    record = ModelRecord("listed", str(tmp_path / "id-00000000" / "model.safetensors"),
                         "safetensors", "nin", 3, (3, 8, 8))
    write_manifest([record], str(tmp_path / "manifest.csv"), relative=True)
    assert read_manifest(str(tmp_path)) == [record]


def test_round_dir_ground_truth_conflict_and_bad_config(tmp_path):
    _model_dir(tmp_path, "id-00000000", {**ZOO_CONFIG, "poisoned": False}, truth=1)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path))
    assert info.value.field == "poisoned" and info.value.row == 1
    assert info.value.file.endswith(os.path.join("id-00000000", "config.json"))

    other = tmp_path / "other"
    _model_dir(other, "id-00000000", {**ZOO_CONFIG, "num_classes": "ten"})
    with pytest.raises(ManifestError, match="config.json row 1 field 'num_classes'"):
        read_manifest(str(other))


def test_not_a_round_dir(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ManifestError, match="not a manifest file or a round directory"):
        read_manifest(str(tmp_path))


# ---- object storage ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_on_s3(s3_server, fmt):
    base = f"s3://{s3_server.bucket}/test_manifest/{fmt}"
    records = sample_records(f"{base}/models")
    write_manifest(records, f"{base}/manifest.{fmt}", relative=True)
    assert read_manifest(f"{base}/manifest.{fmt}") == records


def test_round_dir_on_s3(s3_server, tmp_path):
    base = f"s3://{s3_server.bucket}/test_manifest/round"
    for name, config in [("id-00000000", ZOO_CONFIG), ("id-00000001", R4_CONFIG)]:
        storage.write_text(f"{base}/models/{name}/ground_truth.csv", "1\n")
        storage.atomic_write_bytes(f"{base}/models/{name}/clean_example_data/class_0_example_0.png",
                                   b"png")
        storage.write_text(f"{base}/models/{name}/config.json", json.dumps(config))
    storage.write_text(f"{base}/models/id-00000002/model.pt", "half written")
    zoo, r4 = read_manifest(base)
    assert zoo.uri == f"{base}/models/id-00000000/model.safetensors"
    assert zoo.examples_uri == f"{base}/models/id-00000000/clean_example_data"
    assert (r4.uri, r4.architecture, r4.target) == (f"{base}/models/id-00000001/model.pt",
                                                    "shufflenet_v2_x1_5", 11)
    with pytest.raises(ManifestError) as info:
        read_manifest(f"{base}/missing.csv")
    assert "file not found" in str(info.value)


# ---- hostile corpora: empty and mislabelled manifests, URIs outside a root ---------------------

PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_manifest_is_an_error_naming_the_file(tmp_path, fmt):
    touched = tmp_path / f"touched.{fmt}"
    touched.write_bytes(b"")  # `touch m.csv`
    with pytest.raises(ManifestError) as info:
        read_manifest(str(touched))
    assert (info.value.file, info.value.row, info.value.field) == (str(touched), None, None)
    assert str(info.value) == f"{touched}: the manifest is empty (no rows)"

    written = str(tmp_path / f"written.{fmt}")  # what our own writer makes of no records
    write_manifest([], written)
    expected = {"csv": "the manifest has a header but no rows",
                "jsonl": "the manifest is empty (no rows)",
                "parquet": "the manifest has columns but no rows",
                "yaml": "the manifest has no rows (an empty list)"}[fmt]
    with pytest.raises(ManifestError) as info:
        read_manifest(written)
    assert str(info.value) == f"{written}: {expected}"


@pytest.mark.parametrize("name,text", [("blank.csv", "\n  \r\n"), ("blank.jsonl", "\n\n  \n"),
                                       ("comment.yaml", "# nothing here\n"),
                                       ("list.yml", "[]\n"), ("null.yaml", "models:\n")])
def test_blank_manifests_are_empty(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError, match=r"the manifest (is empty|has no rows)"):
        read_manifest(str(tmp_path / name))


def test_round_dir_with_an_empty_manifest_or_no_complete_model(tmp_path):
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "manifest.csv").write_text(",".join(GOOD) + "\n")
    with pytest.raises(ManifestError, match="manifest.csv: the manifest has a header but no rows"):
        read_manifest(str(tmp_path / "listed"))

    half = tmp_path / "half"  # model folders still being written: no config.json, no model.pt
    (half / "id-00000000" / "clean_example_data").mkdir(parents=True)
    (half / "id-00000001").mkdir()
    with pytest.raises(ManifestError) as info:
        read_manifest(str(half))
    assert str(info.value).startswith(f"{half}: the round directory has no complete model folder")


@pytest.mark.parametrize("fmt,kind", [("csv", "CSV"), ("jsonl", "JSONL"), ("yaml", "YAML")])
def test_binary_file_under_a_text_name(tmp_path, fmt, kind):
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(PNG_BYTES)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert str(info.value) == (f"{path}: not a UTF-8 text {kind} file (byte 0x89 at offset 0); "
                               f"expected a manifest in {kind}")
    path.write_bytes(b"model_id,uri\n\xff\xfe")  # the offset is where the bad byte is
    with pytest.raises(ManifestError, match=r"\(byte 0xff at offset 13\)"):
        read_manifest(str(path))


@pytest.mark.parametrize("content", [PNG_BYTES, ",".join(GOOD).encode() + b"\n", b"PAR1"])
def test_not_a_parquet_file(tmp_path, content):
    path = tmp_path / "m.parquet"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert (info.value.file, info.value.row, info.value.field) == (str(path), None, None)
    assert str(info.value).startswith(f"{path}: not a")
    assert "Parquet file" in str(info.value)
    if content is PNG_BYTES:
        assert "not a Parquet file" in str(info.value)


def test_hostile_cells_name_the_row(tmp_path):
    path = tmp_path / "m.csv"
    head = ",".join(GOOD) + "\n" + ",".join(map(str, GOOD.values())) + "\n"
    path.write_text(head + "m1,m.pt,state_dict,nin,10," + "x" * 200_000 + "\n")
    with pytest.raises(ManifestError, match=r"m.csv row 2: invalid CSV: field larger than"):
        read_manifest(str(path))
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl row 2: invalid JSON: nested too deeply"):
        read_manifest(str(path))
    path = tmp_path / "m.yaml"
    path.write_text("[" * 100_000)
    with pytest.raises(ManifestError, match=r"m.yaml: invalid YAML: nested too deeply"):
        read_manifest(str(path))


def _rows_with_uris(*uris: str, examples: str | None = None) -> list[dict]:
    rows = [{**GOOD, "model_id": f"m{i}", "uri": uri} for i, uri in enumerate(uris)]
    if examples is not None:
        rows[-1]["examples_uri"] = examples
    return rows


@pytest.mark.parametrize("escape,field", [
    ("../../etc/passwd", "uri"),
    ("/etc/shadow", "uri"),
    ("models/../../round-evil/m.pt", "uri"),  # a sibling folder that shares the root's prefix
    ("file:///etc/passwd", "uri"),
    ("s3://bucket/m.pt", "uri"),  # another scheme is outside a local root
    ("link.pt", "uri"),  # a symlink inside the root pointing out of it
    ("examples:../../etc", "examples_uri"),
])
def test_root_confines_model_and_examples_uris(tmp_path, escape, field):
    root = tmp_path / "round"
    (root / "models").mkdir(parents=True)
    (root / "link.pt").symlink_to("/etc/passwd")
    if escape.startswith("examples:"):
        rows = _rows_with_uris("models/m0.pt", "models/m1.pt", examples=escape.split(":", 1)[1])
    else:
        rows = _rows_with_uris("models/m0.pt", escape)
    uri = _write_rows(root / "manifest.csv", "csv", rows)
    records = read_manifest(uri)  # no root: read as before
    assert len(records) == 2
    target = getattr(records[1], field)
    for given in (str(root), str(root) + "/", f"file://{root}"):
        with pytest.raises(ManifestError) as info:
            read_manifest(uri, root=given, check_uris=True)  # before anything is probed
        assert (info.value.file, info.value.row, info.value.field) == (uri, 2, field)
        assert str(info.value) == (f"{uri} row 2 field '{field}': {target} is outside the "
                                   f"allowed root {given}")


def test_root_accepts_what_is_inside(tmp_path):
    root = tmp_path / "round"
    (root / "models" / "ex").mkdir(parents=True)
    rows = _rows_with_uris("models/m0.pt", str(root / "models" / "sub" / ".." / "m1.pt"),
                           examples="models/ex")
    uri = _write_rows(root / "manifest.jsonl", "jsonl", rows)
    assert read_manifest(uri, root=str(root)) == read_manifest(uri)
    assert read_manifest(uri, root=root) == read_manifest(uri, root=str(tmp_path))
    with pytest.raises(ManifestError, match="row 1 field 'uri': .* is outside the allowed root"):
        read_manifest(uri, root=str(root / "models" / "ex"))

    _model_dir(root / "models", "id-00000000", ZOO_CONFIG)  # round directories too
    (root / "manifest.jsonl").unlink()
    assert len(read_manifest(str(root), root=str(root))) == 1
    with pytest.raises(ManifestError, match="model.safetensors is outside the allowed root"):
        read_manifest(str(root), root=str(tmp_path / "elsewhere"))


def test_root_on_object_storage_uris():
    base = "memory://test_manifest_root"
    rows = _rows_with_uris("models/m0.pt", "../other/m1.pt")
    storage.write_text(f"{base}/round/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    uri = f"{base}/round/manifest.jsonl"
    with pytest.raises(ManifestError) as info:
        read_manifest(uri, root=f"{base}/round")
    assert str(info.value) == (f"{uri} row 2 field 'uri': {base}/other/m1.pt is outside the "
                               f"allowed root {base}/round")
    assert len(read_manifest(uri, root=base)) == 2
    with pytest.raises(ManifestError, match="row 1 field 'uri'"):
        read_manifest(uri, root="/")  # a local root does not admit memory:// URIs
