"""Round directories on disk -> manifest records: TrojAI image-classification rounds 1-4
(docs/algorithms/trojai-format.md) and the zoo's own rounds (xray.zoo.round).

    records = read_round("/data/round4-train-dataset")        # models/ or flat, METADATA.csv
    records = read_round(uri, split="test", exclude_errata=True)

A round is a folder of id-*/ model folders (directly or under models/). Each folder becomes one
`ModelRecord`:

  dialect  where the facts come from                       how it is recognised
  r1       METADATA.csv (no config.json in the whole round)  no config.json anywhere
  r2       config.json, upper-case keys (POISONED, ...)      MODEL_ARCHITECTURE
  r3       r2 keys + adversarial-training keys               MODEL_ARCHITECTURE + ADVERSARIAL*
  r4       config.json, lower-case jsonpickle keys           model_architecture
  zoo      the zoo's own config.json (zoo_row_from_config)   architecture

config.json is always read with json.load: a jsonpickle file (r4, "py/object" tags) is plain
JSON and is never decoded into objects. Architecture names of the TrojAI generator
(wideresnet50, inceptionv3, ...) map to torchvision names (TROJAI_ARCHITECTURES).

What the record carries:
  uri / format       model.pt, format "pickle" (whole-module torch.save: loads only with
                     allow_pickle, inside a worker; nothing here opens it)
  examples_uri       clean_example_data/ (r3-4), else example_data/ (r1-2)
  preprocessing      the round's, as data: r1 BGR + per-image min-max, no crop; r2-4 RGB,
                     centre crop 224, x / 255 (PREPROCESSING)
  input_shape        (3, 224, 224); mean / std (0) / (1): TrojAI models take [0, 1] input
  poisoned / target / attack   ground truth only (ground_truth.csv, else config / METADATA);
                     the trigger facts go nowhere else (tags hold only the round and split)
  tags               {"trojai_round": "r1".."r4", "split": "train"|"test" when known}

An `xray` block in config.json (written by xray.zoo.trojai_export) overrides input_shape, mean,
std, preprocessing and tags, so a zoo round exported in the TrojAI layout reads back as the same
records as the zoo's own manifest.

Round 1 errata (labelled poisoned, no trigger; docs/algorithms/trojai-format.md) are left out
by default (`exclude_errata`). Which ids depends on the split (train / test): given, or inferred
from the folder name ("train" / "test" / "holdout" in a path component). Inferred (not in the
spec): when the split is unknown, every errata id of both lists that is labelled poisoned is left
out, with a warning, since the test errata ids also exist in the train round.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import posixpath
import re
from typing import Any, Mapping

from xray.io import storage
from xray.io.examples import CLEAN_NAME
from xray.io.records import ModelRecord
from xray.io.rows import BadValue, ManifestError, as_bool, is_missing, record_from_row

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GROUND_TRUTH_FILE = "ground_truth.csv"
METADATA_FILE = "METADATA.csv"
MODEL_FILE = "model.pt"
EXAMPLE_DIRS = ("clean_example_data", "example_data")
XRAY_KEY = "xray"
MODEL_DIR = re.compile(r"^id-[0-9A-Za-z_-]+$")
ROUNDS = ("r1", "r2", "r3", "r4")

# TrojAI generator architecture names (round_config.py) -> torchvision names.
TROJAI_ARCHITECTURES = {
    "wideresnet50": "wide_resnet50_2", "wideresnet101": "wide_resnet101_2",
    "inceptionv3": "inception_v3", "inceptionv1": "googlenet",
    "squeezenetv1_0": "squeezenet1_0", "squeezenetv1_1": "squeezenet1_1",
    "mobilenetv2": "mobilenet_v2", "shufflenet1_0": "shufflenet_v2_x1_0",
    "shufflenet1_5": "shufflenet_v2_x1_5", "shufflenet2_0": "shufflenet_v2_x2_0",
    "vgg11bn": "vgg11_bn", "vgg13bn": "vgg13_bn", "vgg16bn": "vgg16_bn", "vgg19bn": "vgg19_bn",
}
INPUT_SHAPE = (3, 224, 224)
PREPROCESSING = {
    "r1": {"channel_order": "BGR", "center_crop": None, "scale": "minmax"},
    **{r: {"channel_order": "RGB", "center_crop": 224, "scale": "unit"}
       for r in ("r2", "r3", "r4")},
}
R1_NUM_CLASSES = 5
R1_ERRATA = {"train": ("id-00000184", "id-00000599", "id-00000858", "id-00001088"),
             "test": ("id-00000077", "id-00000083")}
# METADATA.csv column names by fact, first match wins (r1-r4 spell them differently).
_META = {
    "model_id": ("model_name", "model_id", "name"),
    "architecture": ("model_architecture", "MODEL_ARCHITECTURE", "architecture"),
    "num_classes": ("number_classes", "NUMBER_CLASSES", "num_classes"),
    "poisoned": ("poisoned", "POISONED", "ground_truth"),
    "target": ("trigger_target_class", "TRIGGER_TARGET_CLASS", "triggers_0_target_class"),
    "attack": ("trigger_type", "TRIGGER_TYPE", "triggers_0_type"),
}


def architecture_name(name: Any) -> Any:
    """A TrojAI generator architecture name as the torchvision name (others unchanged)."""
    return TROJAI_ARCHITECTURES.get(name.lower(), name) if isinstance(name, str) else name


def config_dialect(config: Mapping[str, Any]) -> str:
    """'zoo', 'r2', 'r3' or 'r4' for a parsed config.json (ValueError if none fits)."""
    if "architecture" in config:
        return "zoo"
    if "model_architecture" in config or "py/object" in config:
        return "r4"
    if "MODEL_ARCHITECTURE" in config:
        return "r3" if any(str(k).upper().startswith("ADVERSARIAL") for k in config) else "r2"
    raise ValueError("config.json names no architecture (expected 'architecture', "
                     "'model_architecture' (TrojAI r4) or 'MODEL_ARCHITECTURE' (TrojAI r2/r3))")


def infer_split(uri: str) -> str | None:
    """'train' / 'test' from the round's folder names (e.g. round1-test-dataset), else None."""
    parts = [p.lower() for p in re.split(r"[/\\]", str(uri)) if p]
    for part in reversed(parts):
        words = set(re.split(r"[-_.\s]", part))
        if words & {"test", "holdout"}:
            return "test"
        if "train" in words or "training" in words:
            return "train"
    return None


def _first(mapping: Mapping[str, Any], keys) -> Any:
    for key in keys:
        if key in mapping and mapping[key] not in (None, ""):
            return mapping[key]
    return None


def _truthy(value: Any) -> Any:
    """METADATA / config truth values ('True', '1', 1, True) as bool; anything else unchanged."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1", "1.0", "false", "0", "0.0"):
        return text in ("true", "1", "1.0")
    return value


def _base_row(folder: str, names: set[str], dialect: str, xray: Mapping[str, Any],
              split: str | None) -> dict[str, Any]:
    tags = {"trojai_round": dialect, **({"split": split} if split else {})}
    return {
        "model_id": folder,
        "uri": MODEL_FILE,
        "format": "pickle",
        "input_shape": xray.get("input_shape") or INPUT_SHAPE,
        "mean": xray.get("mean"),
        "std": xray.get("std"),
        "examples_uri": next((d for d in EXAMPLE_DIRS if d in names), None),
        "tags": xray["tags"] if "tags" in xray else tags,
        "preprocessing": xray["preprocessing"] if "preprocessing" in xray
        else PREPROCESSING[dialect],
    }


def row_from_config(config: Mapping[str, Any], folder: str, names: set[str],
                    ground_truth: bool | None = None, *, split: str | None = None,
                    metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A manifest row from a TrojAI r2 / r3 / r4 config.json (paths relative to the folder).

    The row's poisoned / target / attack are ground truth for the reducer only. A conflict
    between ground_truth.csv and the config's poisoned flag raises ValueError("poisoned: ...").
    """
    dialect = config_dialect(config)
    if dialect == "zoo":
        raise ValueError("a zoo config.json; read it with zoo_row_from_config")
    xray = config.get(XRAY_KEY) if isinstance(config.get(XRAY_KEY), dict) else {}
    meta = metadata or {}
    upper = dialect in ("r2", "r3")
    architecture = config.get("MODEL_ARCHITECTURE" if upper else "model_architecture")
    num_classes = config.get("NUMBER_CLASSES" if upper else "number_classes")
    poisoned = _truthy(config.get("POISONED" if upper else "poisoned"))
    if poisoned is None:
        poisoned = _truthy(_first(meta, _META["poisoned"]))
    if ground_truth is not None:
        if isinstance(poisoned, bool) and poisoned != ground_truth:
            raise ValueError(f"poisoned: config.json says {poisoned!r} but {GROUND_TRUTH_FILE} "
                             f"says {int(ground_truth)}")
        poisoned = ground_truth

    if upper:
        target = config.get("TRIGGER_TARGET_CLASS")
        attack = config.get("TRIGGER_TYPE")
    else:
        target, attack = None, None
        triggers = config.get("triggers")
        dicts = [t for t in triggers if isinstance(t, dict)] if isinstance(triggers, list) else []
        if dicts:
            target = dicts[0].get("target_class")
            kinds = sorted({str(t.get("type") or t.get("trigger_type")) for t in dicts})
            attack = "+".join(kinds)
    if poisoned is False:
        target = attack = None
    return {**_base_row(folder, names, dialect, xray, split),
            "architecture": architecture_name(architecture), "num_classes": num_classes,
            "poisoned": poisoned, "target": target, "attack": attack}


# The zoo dialect: weights file name -> format, when config.json names no format.
ZOO_WEIGHT_FORMATS = {".safetensors": "safetensors", ".torchscript.pt": "torchscript",
                      ".ts": "torchscript"}


def _first_key(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    return None


def zoo_row_from_config(config: Mapping[str, Any], folder: str, names: set[str],
                        ground_truth: bool | None = None, *, file: str = CONFIG_FILE,
                        number: int | None = None) -> dict[str, Any]:
    """A manifest row from a zoo model folder's config.json (xray.zoo.round writes it; TrojAI
    configs, which name no 'architecture', are read by row_from_config).

    Relative paths in the row (weights, examples) are relative to the model folder. The
    upper-case TrojAI spellings of poisoned / target / class count, and a TrojAI `triggers` list,
    are still accepted beside the zoo's own keys.
    """
    if "architecture" not in config:
        raise ManifestError(file, number, None, "not a zoo config.json (no 'architecture'); "
                            "TrojAI round configs are read by row_from_config")
    weights = config.get("weights") or "model.pt"
    fmt = config.get("format") or next(
        (f for ext, f in ZOO_WEIGHT_FORMATS.items() if weights.endswith(ext)), "pickle")
    architecture = architecture_name(config["architecture"])
    examples = config.get("examples") or next((d for d in EXAMPLE_DIRS if d in names), None)

    poisoned = _first_key(config, "poisoned", "POISONED")
    if ground_truth is not None:
        if not is_missing(poisoned):
            try:
                agrees = as_bool(poisoned) == ground_truth
            except BadValue:
                agrees = True  # reported as a type error when the row is checked
            if not agrees:
                raise ManifestError(file, number, "poisoned", f"config.json says {poisoned!r} "
                                    f"but {GROUND_TRUTH_FILE} says {int(ground_truth)}")
        poisoned = ground_truth

    target = _first_key(config, "target", "TRIGGER_TARGET_CLASS")
    attack = _first_key(config, "attack")
    triggers = config.get("triggers")
    if isinstance(triggers, list) and triggers:
        dicts = [t for t in triggers if isinstance(t, dict)]
        if target is None and dicts:
            target = dicts[0].get("target_class")
        if attack is None:
            kinds = sorted({str(t.get("type") or t.get("trigger_type")) for t in dicts})
            attack = "+".join(kinds) or None

    return {
        "model_id": config.get("model_id") or folder,
        "uri": weights,
        "format": fmt,
        "architecture": architecture,
        "num_classes": _first_key(config, "num_classes", "number_classes", "NUMBER_CLASSES"),
        "input_shape": config.get("input_shape"),
        "mean": config.get("mean"),
        "std": config.get("std"),
        "examples_uri": examples,
        "poisoned": poisoned,
        "target": target,
        "attack": attack,
        "tags": config.get("tags") or {},
        "preprocessing": config.get("preprocessing") or {},
    }


def r1_row(folder: str, names: set[str], ground_truth: bool | None,
           metadata: Mapping[str, Any] | None, *, split: str | None = None,
           example_classes: int | None = None) -> dict[str, Any]:
    """A manifest row for a round-1 folder (no config.json): METADATA.csv supplies the
    architecture; the class count is METADATA's, else the example classes found, else 5."""
    meta = metadata or {}
    poisoned = ground_truth
    if poisoned is None:
        poisoned = _truthy(_first(meta, _META["poisoned"]))
    target, attack = _first(meta, _META["target"]), _first(meta, _META["attack"])
    if poisoned is True and attack is None:
        attack = "polygon"  # round 1 has polygon triggers only (docs/algorithms/trojai-format.md)
    if poisoned is not True:
        target = attack = None
    return {**_base_row(folder, names, "r1", {}, split),
            "architecture": architecture_name(_first(meta, _META["architecture"])),
            "num_classes": _first(meta, _META["num_classes"]) or example_classes or R1_NUM_CLASSES,
            "poisoned": poisoned, "target": target, "attack": attack}


def parse_ground_truth(data: bytes) -> bool:
    """ground_truth.csv: float(first line) must be 0 or 1 (ValueError otherwise)."""
    lines = data.decode("utf-8-sig").strip().splitlines()
    try:
        value = float(lines[0].strip().rstrip(","))
    except (IndexError, ValueError):
        value = float("nan")
    if value not in (0.0, 1.0):
        raise ValueError(f"expected 0 or 1, got {data[:40]!r}")
    return value == 1.0


def read_metadata(data: bytes) -> dict[str, dict[str, Any]]:
    """METADATA.csv rows by model id (column model_name / model_id / name)."""
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    out = {}
    for row in rows:
        key = _first(row, _META["model_id"])
        if key:
            out[str(key).strip()] = row
    return out


def model_root(fs, root: str) -> str | None:
    """The folder holding the id-*/ model folders: the round itself or its models/."""
    for candidate in (root, posixpath.join(root, "models")):
        if fs.isdir(candidate) and any(MODEL_DIR.match(posixpath.basename(p.rstrip("/")))
                                       for p in fs.ls(candidate, detail=False)):
            return candidate
    return None


def read_round(uri: str, *, exclude_errata: bool = True,
               split: str | None = None) -> list[ModelRecord]:
    """Records of the complete model folders of a round (see the module docstring).

    Complete: holds config.json; in a round without any config.json (round 1), holds model.pt.
    Other folders are being written and are skipped with a warning. Zoo configs are read by
    `zoo_row_from_config`, TrojAI ones by `row_from_config`.
    """
    uri = str(uri).rstrip("/")
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    models_dir = model_root(fs, root)
    if models_dir is None:
        raise ManifestError(uri, None, None, "not a manifest file or a round directory "
                                             "(no manifest.*, no id-*/ folders here or in models/)")
    children: dict[str, set[str]] = {}
    for path in storage.with_retries(lambda: fs.find(models_dir, maxdepth=2, withdirs=True)):
        rel = path.rstrip("/")[len(models_dir):].strip("/").split("/")
        if MODEL_DIR.match(rel[0]):
            names = children.setdefault(rel[0], set())
            if len(rel) == 2:
                names.add(rel[1])
    round1 = not any(CONFIG_FILE in names for names in children.values())
    marker = MODEL_FILE if round1 else CONFIG_FILE
    complete = sorted(d for d, names in children.items() if marker in names)
    skipped = sorted(set(children) - set(complete))
    if skipped:
        log.warning("%s: skipping %d model folder(s) without %s (incomplete): %s", uri,
                    len(skipped), marker, ", ".join(skipped[:5]))
    split = split or infer_split(uri)

    def fetch(name: str, dirs: list[str]) -> dict[str, bytes]:
        paths = [posixpath.join(models_dir, d, name) for d in dirs]
        data = storage.with_retries(lambda: fs.cat(paths, on_error="raise")) if paths else {}
        if len(paths) == 1 and not isinstance(data, dict):
            data = {paths[0]: data}
        return {posixpath.basename(posixpath.dirname(p.rstrip("/"))): v for p, v in data.items()}

    metadata: dict[str, dict[str, Any]] = {}
    for folder in dict.fromkeys([root, models_dir]):
        path = posixpath.join(folder, METADATA_FILE)
        if storage.with_retries(functools.partial(fs.exists, path)):
            metadata = read_metadata(storage.with_retries(functools.partial(fs.cat_file, path)))
            break
    configs = {} if round1 else fetch(CONFIG_FILE, complete)
    truths = fetch(GROUND_TRUTH_FILE, [d for d in complete if GROUND_TRUTH_FILE in children[d]])
    root_uri = models_dir if storage.is_local(uri) else fs.unstrip_protocol(models_dir)
    records: list[ModelRecord] = []
    for number, name in enumerate(complete, start=1):
        model_uri = storage.join(root_uri, name)
        file = storage.join(model_uri, GROUND_TRUTH_FILE if round1 else CONFIG_FILE)
        truth = None
        if name in truths:
            try:
                truth = parse_ground_truth(truths[name])
            except ValueError as e:
                raise ManifestError(storage.join(model_uri, GROUND_TRUTH_FILE), number,
                                    "poisoned", str(e)) from None
        if round1:
            classes = None
            if any(d in children[name] for d in EXAMPLE_DIRS):
                classes = _example_classes(fs, posixpath.join(models_dir, name), children[name])
            row = r1_row(name, children[name], truth, metadata.get(name), split=split,
                         example_classes=classes)
            if row["architecture"] is None:
                raise ManifestError(file, number, "architecture",
                                    "a round-1 model folder (no config.json): its architecture "
                                    f"comes from {METADATA_FILE} (column model_architecture), "
                                    "which has no row for it")
        else:
            try:
                config = json.loads(configs[name].decode("utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ManifestError(file, number, None, f"invalid JSON: {e}") from None
            if not isinstance(config, dict):
                raise ManifestError(file, number, None, "expected a JSON object")
            try:
                dialect = config_dialect(config)
                if dialect == "zoo":
                    row = zoo_row_from_config(config, name, children[name], truth, file=file,
                                              number=number)
                else:
                    row = row_from_config(config, name, children[name], truth, split=split,
                                          metadata=metadata.get(name))
            except ManifestError:
                raise
            except ValueError as e:
                field, _, message = str(e).partition(": ")
                if field in ("poisoned",):
                    raise ManifestError(file, number, field, message) from None
                raise ManifestError(file, number, None, str(e)) from None
        records.append(record_from_row(row, file=file, row_number=number, base=model_uri))
    seen: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        if record.model_id in seen:
            raise ManifestError(uri, number, "model_id", f"duplicate model_id "
                                f"{record.model_id!r} (also in row {seen[record.model_id]})")
        seen[record.model_id] = number
    if round1 and exclude_errata:
        records = _drop_errata(records, split, uri)
    return records


def _example_classes(fs, folder: str, names: set[str]) -> int | None:
    examples = next(d for d in EXAMPLE_DIRS if d in names)
    files = storage.with_retries(lambda: fs.ls(posixpath.join(folder, examples), detail=False))
    classes = {int(m.group(1)) for p in files
               if (m := CLEAN_NAME.match(posixpath.basename(p.rstrip("/"))))}
    return (max(classes) + 1) if classes else None


def errata_ids(split: str | None) -> set[str]:
    """The round-1 errata ids of a split; both lists when the split is unknown."""
    if split in R1_ERRATA:
        return set(R1_ERRATA[split])
    return {i for ids in R1_ERRATA.values() for i in ids}


def _drop_errata(records: list[ModelRecord], split: str | None, uri: str) -> list[ModelRecord]:
    ids = errata_ids(split)
    drop = {r.model_id for r in records if r.model_id in ids and r.poisoned is not False}
    if drop:
        how = f"the {split} errata" if split in R1_ERRATA else \
            "errata of both splits (split unknown: pass split='train' or 'test')"
        log.warning("%s: leaving out %d round-1 model(s), %s: %s", uri, len(drop), how,
                    ", ".join(sorted(drop)))
    return [r for r in records if r.model_id not in drop]
