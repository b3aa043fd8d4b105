"""The fitted stacker as a versioned JSON artifact (`Calibrator`): identity, storage, the
leakage check against its training models, and numpy-only prediction."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.special import expit

from xray.io import storage
from xray.reduce.calibrate.features import features_from_results

FORMAT = "xray-calibrator"
FORMAT_VERSION = 2  # 2: training_models (model_id, model_digest) pairs; 1 still loads
READABLE_VERSIONS = (1, 2)
STACKER_VERSION = "stacker-2"  # 2: the target_agreement feature and its candidates


class LeakageUncheckedWarning(UserWarning):
    """A calibrator without its training-model list (format version 1): whether it is applied
    to its own training models cannot be checked."""


class TrainingModelError(ValueError):
    """A calibrator applied to models it was trained on, where that is refused."""


@dataclass
class Calibrator:
    detectors: list[dict[str, str]]       # [{name, version, config_hash}] it was trained on
    features: list[str]
    impute: list[float]                   # training means (missing value -> this)
    mean: list[float]                     # standardisation
    scale: list[float]
    coef: list[float]
    intercept: float
    C: float
    clip: tuple[float, float] = (0.01, 0.99)
    scan: dict[str, Any] = field(default_factory=dict)   # the training run's scan config
    train: dict[str, Any] = field(default_factory=dict)  # provenance and fit figures
    created_at: str = ""
    # [[model_id, model_digest], ...] of every score row it was fitted on; None: unknown (an
    # artifact of format version 1), so leakage cannot be checked
    training_models: list[list[str]] | None = None
    source: str = field(default="", compare=False)  # where it was loaded from (for messages)

    # -- identity and storage
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "version": STACKER_VERSION,
                "id": self.id, "detectors": self.detectors, "features": self.features,
                "impute": self.impute, "mean": self.mean, "scale": self.scale,
                "coef": self.coef, "intercept": self.intercept, "C": self.C,
                "clip": list(self.clip), "scan": self.scan, "train": self.train,
                "created_at": self.created_at, "training_models": self.training_models}

    @property
    def id(self) -> str:
        """Digest of the fitted numbers: the combined detector's config_hash."""
        payload = {"features": self.features, "impute": self.impute, "mean": self.mean,
                   "scale": self.scale, "coef": self.coef, "intercept": self.intercept,
                   "clip": list(self.clip), "detectors": self.detectors}
        text = json.dumps(payload, sort_keys=True, default=float)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, uri: str) -> str:
        storage.atomic_write_bytes(uri, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return uri

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> "Calibrator":
        where = source or "<calibrator>"
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not an xray calibrator (format {d.get('format')!r})")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{where}: calibrator format version {d.get('format_version')!r}; "
                             f"this xray reads versions {list(READABLE_VERSIONS)} "
                             "(refit with xray calibrate)")
        n = len(d["features"])
        if not all(len(d[k]) == n for k in ("impute", "mean", "scale", "coef")):
            raise ValueError(f"{where}: feature, mean, scale and coefficient lists differ "
                             "in length")
        cal = cls(detectors=list(d["detectors"]), features=list(d["features"]),
                  impute=[float(v) for v in d["impute"]], mean=[float(v) for v in d["mean"]],
                  scale=[float(v) for v in d["scale"]], coef=[float(v) for v in d["coef"]],
                  intercept=float(d["intercept"]), C=float(d["C"]), clip=tuple(d["clip"]),
                  scan=dict(d.get("scan") or {}), train=dict(d.get("train") or {}),
                  created_at=str(d.get("created_at", "")), source=source)
        if d.get("id") and d["id"] != cal.id:
            raise ValueError(f"{where}: the numbers do not match the stored id (edited file?)")
        # The training list is provenance, not a fitted number: it is not part of the id, so
        # version-1 artifacts keep their ids.
        pairs = d.get("training_models")
        if pairs is None:
            warnings.warn(f"calibrator {cal.name} has no list of its training models (format "
                          f"version {d.get('format_version')}): whether it is applied to the "
                          "models it was trained on cannot be checked; refit with xray "
                          "calibrate", LeakageUncheckedWarning, stacklevel=2)
        else:
            cal.training_models = [[str(m), str(g)] for m, g in pairs]
        return cal

    @classmethod
    def load(cls, uri: str) -> "Calibrator":
        try:
            d = json.loads(storage.read_text(uri))
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: not a calibrator JSON file ({e})") from None
        return cls.from_dict(d, uri)

    # -- leakage: is a model one of those it was trained on?
    @property
    def name(self) -> str:
        return f"{self.id} ({self.source})" if self.source else self.id

    def trained_on(self, model_id: str, model_digest: str) -> bool | None:
        """Whether (model_id, model_digest) is one of its training models (both must match: a
        reused id with other weights is another model); None when it cannot tell."""
        if self.training_models is None:
            return None
        return [str(model_id), str(model_digest)] in self.training_models

    def training_overlap(self, pairs: Iterable[tuple[str, str]]) -> list[str]:
        """Sorted model ids among (model_id, model_digest) `pairs` it was trained on."""
        return sorted({str(m) for m, g in pairs if self.trained_on(m, g)})

    def refuse_training_models(self, pairs: Iterable[tuple[str, str]], hint: str = "") -> None:
        """Raise TrainingModelError naming the calibrator and the models when any of `pairs`
        is one of its training models."""
        ids = self.training_overlap(pairs)
        if ids:
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            raise TrainingModelError(
                f"calibrator {self.name} was trained on {len(ids)} of these models ({shown}): "
                "its probabilities for them are in-sample, not a held-out figure"
                + (f"; {hint}" if hint else ""))

    # -- prediction
    @property
    def detector_names(self) -> list[str]:
        return [d["name"] for d in self.detectors]

    def matrix(self, feature_dicts: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Raw feature matrix (NaN = missing) with the indicators filled in."""
        x = np.full((len(feature_dicts), len(self.features)), np.nan)
        for i, feats in enumerate(feature_dicts):
            present = {name.split(".", 1)[0] for name in feats if name.endswith(".score")}
            for j, name in enumerate(self.features):
                if name.endswith(".missing"):
                    x[i, j] = 0.0 if name[: -len(".missing")] in present else 1.0
                elif name in feats:
                    x[i, j] = feats[name]
        return x

    def predict(self, feature_dicts: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Probabilities of being trojaned, clipped to `clip`."""
        x = self.matrix(feature_dicts)
        x = np.where(np.isnan(x), np.asarray(self.impute)[None, :], x)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        p = expit(z @ np.asarray(self.coef) + self.intercept)
        return np.clip(p, *self.clip)

    def predict_results(self, results: Mapping[str, Mapping[str, Any]],
                        num_classes: int | None) -> float:
        return float(self.predict([features_from_results(results, num_classes)])[0])

    def scan_config(self):
        """The ScanConfig the calibrator was trained under (its detectors and settings)."""
        # local: xray.config imports every detector (torch); applying a calibrator needs none
        from xray.config import parse_config

        return parse_config(self.scan or {"detectors": {n: {} for n in self.detector_names}},
                            source=f"calibrator {self.id}", stored=True)
