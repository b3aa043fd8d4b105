"""The combined probability without a calibrator: a fixed, rank-free monotone map of the best
available detector (see the package docstring)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.special import expit

from xray.reduce.calibrate.features import model_results, row_probability

DEFAULT_VERSION = "default-map-2"  # 2: `weights` first, with its own map
# The first of these that answered gives the probability: `weights` held out best on every
# evaluation round but the clean-label one (docs/fidelity/combined.md), and needs no data.
DEFAULT_ORDER = ("weights", "modelxray")
DEFAULT_CLIP = (0.05, 0.95)
MODELXRAY_DEFAULT_MAP = {"centre": 0.45, "scale": 0.15}
# p = expit((score - centre) / scale) of the weights detector's largest MAD index: the Platt
# scaling `xray calibrate` chose for `weights` on the evaluation's training round (39 models,
# 10-class signs CNN; C = 10 by cross-validation), written as a centre and a scale.
WEIGHTS_DEFAULT_MAP = {"centre": 3.47, "scale": 0.67}


def default_probability(detector: str, score: float, stats: Mapping[str, Any] | None,
                        num_classes: int | None) -> float:
    """The documented rank-free monotone map of one detector's result to [0.05, 0.95]."""
    stats = stats or {}
    p = row_probability(stats)
    if math.isnan(p):
        re = stats.get("re")
        if detector == "modelxray" and isinstance(re, (int, float)) and num_classes:
            x = float(re) / math.log2(max(int(num_classes), 2))
            p = float(expit((MODELXRAY_DEFAULT_MAP["centre"] - x) / MODELXRAY_DEFAULT_MAP["scale"]))
        elif detector == "weights":
            p = float(expit((score - WEIGHTS_DEFAULT_MAP["centre"]) / WEIGHTS_DEFAULT_MAP["scale"]))
        else:
            p = float(expit(score))
    return float(np.clip(p, *DEFAULT_CLIP))


def default_combined(results: Mapping[str, Mapping[str, Any]], num_classes: int | None
                     ) -> tuple[float, str | None]:
    """(probability, detector used) without a calibrator: the first of DEFAULT_ORDER that has
    a result, else the alphabetically first; (0.5, None) when there is none."""
    names = [n for n in DEFAULT_ORDER if n in results] + sorted(set(results) - set(DEFAULT_ORDER))
    if not names:
        return 0.5, None
    best = names[0]
    r = results[best]
    return default_probability(best, float(r["score"]), r.get("stats"), num_classes), best


def detector_probabilities(scores: pd.DataFrame) -> pd.DataFrame:
    """model_id x detector frame of `default_probability` (NaN where no usable score)."""
    data: dict[str, dict[str, float]] = {}
    for mid, results in model_results(scores).items():
        for name, r in results.items():
            k = r["row"].get("num_classes")
            k = None if k is None or pd.isna(k) else int(k)
            data.setdefault(name, {})[mid] = default_probability(name, r["score"], r["stats"], k)
    frame = pd.DataFrame(data)
    return frame[sorted(frame.columns)] if len(frame.columns) else frame
