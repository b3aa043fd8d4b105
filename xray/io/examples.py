"""Example images: a folder of PNGs named class_<c>_example_<i>.png (the TrojAI layout).

    x, y = load_examples(record)            # float32 N x C x H x W in [0, 1], int64 labels
    write_examples(x, y, "out/id-00000000/clean_example_data")

Files load in (class, index) order. TrojAI r4 poisoned names, class_<c>_trigger_<t>_example_<i>.png,
are never loaded as clean data. `record.preprocessing` says how a round's images become model
input, as data (defaults in `DEFAULT_PREPROCESSING`), applied in this order:
  channel_order  "RGB" | "BGR"   order of the channels handed to the model (files are RGB)
  center_crop    int | None      square centre crop (torchvision CenterCrop offsets)
  scale          "unit"          x / 255
                 "minmax"        per image (x - min) / (max - min) over all channels (TrojAI r1)
Images decode as grayscale when the record's input_shape has one channel, else as RGB.
"""
from __future__ import annotations

import io
import itertools
import re
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from xray.io import storage
from xray.io.records import ModelRecord

DEFAULT_PREPROCESSING: dict[str, Any] = {"channel_order": "RGB", "center_crop": None,
                                         "scale": "unit"}
CHANNEL_ORDERS = ("RGB", "BGR")
SCALES = ("unit", "minmax")
CLEAN_NAME = re.compile(r"^class_(\d+)_example_(\d+)\.png$", re.IGNORECASE)
POISONED_NAME = re.compile(r"^class_(\d+)_trigger_(\d+)_example_(\d+)\.png$", re.IGNORECASE)


def check_preprocessing(preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing dict as given, after checking keys and values (ValueError if wrong)."""
    unknown = sorted(set(preprocessing) - set(DEFAULT_PREPROCESSING))
    if unknown:
        raise ValueError(f"unknown preprocessing key(s) {unknown}; "
                         f"known: {sorted(DEFAULT_PREPROCESSING)}")
    order = preprocessing.get("channel_order", "RGB")
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {order!r}")
    crop = preprocessing.get("center_crop")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop <= 0):
        raise ValueError(f"center_crop must be a positive integer or null, got {crop!r}")
    scale = preprocessing.get("scale", "unit")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return dict(preprocessing)


def list_examples(uri: str, max_per_class: int | None = None) -> list[tuple[int, int, str]]:
    """(class, index, file name) of the clean example PNGs under `uri`, sorted."""
    found = []
    for name in storage.listdir(uri):
        match = CLEAN_NAME.match(name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), name))
    found.sort()
    if max_per_class is not None:
        found = [f for _, group in itertools.groupby(found, key=lambda f: f[0])
                 for f in list(group)[:max_per_class]]
    return found


def preprocess(image: np.ndarray, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """One H x W (x C) uint8 image -> float32 C x H x W as the model expects it."""
    p = {**DEFAULT_PREPROCESSING, **check_preprocessing(preprocessing)}
    x = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    if p["channel_order"] == "BGR" and x.shape[0] == 3:
        x = x.flip(0)
    if p["center_crop"] is not None:
        # Imported here: torchvision costs a process ~1.6 s, and most rounds never crop.
        import torchvision.transforms.functional as TF

        x = TF.center_crop(x, [p["center_crop"], p["center_crop"]])
    x = x.to(torch.float32)
    if p["scale"] == "unit":
        return x / 255.0
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def load_examples(record: ModelRecord,
                  max_per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean examples of a record: x float32 N x C x H x W in [0, 1], y int64, in file order."""
    if not record.examples_uri:
        raise ValueError(f"model {record.model_id}: the record has no examples_uri")
    uri = record.examples_uri
    found = list_examples(uri, max_per_class)
    if not found:
        raise ValueError(f"model {record.model_id}: no clean example images "
                         f"class_<c>_example_<i>.png under {uri}")
    fs, root = storage.filesystem(uri)
    paths = [f"{root.rstrip('/')}/{name}" for _, _, name in found]
    blobs = storage.with_retries(lambda: fs.cat(paths, on_error="raise"))
    if not isinstance(blobs, dict):
        blobs = {paths[0]: blobs}
    channels = record.input_shape[0]
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in paths:
        with Image.open(io.BytesIO(blobs[path])) as image:
            x = preprocess(np.asarray(image.convert(mode)), record.preprocessing)
        if tuple(x.shape) != tuple(record.input_shape):
            raise ValueError(f"{path}: example is {tuple(x.shape)} after preprocessing "
                             f"{record.preprocessing or DEFAULT_PREPROCESSING}; model "
                             f"{record.model_id} expects input_shape {tuple(record.input_shape)}")
        images.append(x)
    labels = torch.tensor([c for c, _, _ in found], dtype=torch.int64)
    return torch.stack(images), labels


def _to_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_examples(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, uri: str,
                   prefix: str = "class_{c}_example_{i}.png") -> list[str]:
    """Write N x C x H x W images (float in [0, 1] or uint8; C = 1 or 3) as PNGs under `uri`.

    `prefix` is the file-name template; {c} is the label and {i} counts within the class in
    the order given. Channels are written as they come (as RGB). Returns the written URIs.
    """
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) != len(y):
        raise ValueError(f"expected x as N x C x H x W with C = 1 or 3 and one label per image, "
                         f"got x {x.shape}, y {y.shape}")
    pixels = _to_uint8(x).transpose(0, 2, 3, 1)
    counts: dict[int, int] = {}
    written = []
    for image, label in zip(pixels, y.tolist()):
        c = int(label)
        i = counts.get(c, 0)
        counts[c] = i + 1
        pil = Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else \
            Image.fromarray(image, "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        target = storage.join(uri, prefix.format(c=c, i=i))
        storage.atomic_write_bytes(target, buf.getvalue())
        written.append(target)
    return written
