"""The model record: one manifest row, the unit of work of a scan.

Ground-truth fields (`poisoned`, `target`, `attack`) reach only the reducer; `scanning.scan_model`
strips nothing from the record but detectors are never handed it (see xray.scanning).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# How a model file is stored. `pickle` (a whole-module torch.save) runs code when loaded and is
# only ever opened with an explicit allow_pickle opt-in, inside a worker.
MODEL_FORMATS = ("state_dict", "safetensors", "torchscript", "pickle")


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    uri: str
    format: str
    architecture: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) the model expects
    mean: tuple[float, ...] = (0.0,)  # normalisation applied before the network; one value per
    std: tuple[float, ...] = (1.0,)  # channel, or one value for all channels
    examples_uri: str | None = None  # folder of clean example PNGs class_<c>_example_<i>.png
    poisoned: bool | None = None  # ground truth (reducer only)
    target: int | None = None
    attack: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # round, split, dataset, ...
    # Round-specific preprocessing of example images (TrojAI rounds), as data:
    # {"channel_order": "RGB"|"BGR", "center_crop": int|None, "scale": "unit"|"minmax"}.
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """Flat, JSON-friendly dict (the manifest's on-disk shape)."""
        row = asdict(self)
        row["input_shape"] = list(self.input_shape)
        row["mean"] = list(self.mean)
        row["std"] = list(self.std)
        return row

    @property
    def ground_truth(self) -> dict[str, Any]:
        return {"poisoned": self.poisoned, "target": self.target, "attack": self.attack}

    def tags_json(self) -> str:
        return json.dumps(self.tags, sort_keys=True)
