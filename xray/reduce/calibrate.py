"""The combined detector: a small regularised stacker over the detectors' scores and statistics.

    cal = fit(read_table(out, "scores", run_id=train_run))    # labelled models of a round
    cal.save("cal.json"); cal = Calibrator.load("cal.json")
    rows = combined_rows(scores, cal)       # score rows of detector "combined" (probability)
    table = summarize(with_combined(scores, cal))   # the reducer: combined beside single ones

Features, per model (`features_from_results`): for every detector the calibrator knows, its
score and its scalar numeric statistics (lists, labels, seeds and settings are left out:
EXCLUDED_STATS), plus ``<detector>.missing`` = 1 when the detector has no ok, finite score for
the model, and ``log2_num_classes`` (an architecture fact a real scan has). Missing values are
handled explicitly: the missing indicator is a feature, and a missing value is imputed with its
training mean (0 after standardisation), so a missing detector contributes only through its
indicator's weight. Features whose training values are constant or present in fewer than half of
the labelled models are dropped at fit time.

Model: scikit-learn LogisticRegression (L2, lbfgs) on standardised features, over one of the
`candidate_models` feature subsets: the base rate alone, each detector alone (Platt scaling of
its score), every detector's score, or scores and statistics. The subset and C (`C` when given,
else C_GRID) are chosen together by stratified k-fold cross-validation (k = min(5, models per
class)) on the harness cross-entropy; a richer subset must beat every simpler one by more than
SELECTION_TOLERANCE (0.01 nats; inferred: chance gains of a noise feature at strong
regularisation are ~0.001): with the few dozen labelled models of a round, the full stacker
overfits and an uninformative detector would push every prediction to a confident mistake, so
the stacker is never chosen over a single detector, or a single detector over the base rate,
unless it predicts held-out models better. `model` forces a subset. The selection figures are
kept in the artifact (train.selection); they are the minimum over many candidates of figures on
the very folds that chose them, so they flatter the chosen one.

The reported figure (train.cross_validated, printed by `xray calibrate`) comes from NESTED
cross-validation: the whole selection above (subset and C, on inner folds) is repeated on the
training part of each outer fold, and the model it picks is fitted there and scored on the
held-out outer fold. It estimates how well the *procedure* (select, then fit) predicts models it
has not seen, which is what the artifact will be used for. Imputation means and standardisation
are computed once on all models (they do not see the labels).

Leakage: the artifact remembers its training models as (model_id, model_digest) pairs
(`training_models`). A prediction for one of them is in-sample. `combined_rows` marks such
rows (stats ``trained_on``), the summary counts them (``n_training_models`` and a note), the
report warns, and `xray score-testset` refuses a test set holding any unless told to score a
corpus that includes the training round (then its summary has a held-out row as well).
Calibrators of format version 1 have no list: they load with a `LeakageUncheckedWarning`.

The fitted numbers (feature names, imputation means, scales, coefficients, intercept) are
stored as a versioned JSON artifact (FORMAT / FORMAT_VERSION), never as a pickle: loading a
calibrator runs no code, and `predict` is numpy (expit(z @ coef + intercept)), so the
trojai-detect driver does not need scikit-learn.
Probabilities are clipped to `clip` (default [0.01, 0.99]), so one confident mistake costs at
most ln(100) = 4.6 in cross-entropy.

Without a calibrator (`default_probability`), the combined probability is a fixed, rank-free
monotone map of the best available detector (DEFAULT_ORDER): for Model X-ray
p = expit((c - re / log2(K)) / s), the Renyi entropy of the plane labels normalised by its
maximum log2(K), against a centre c = 0.45 and scale s = 0.15 (MODELXRAY_DEFAULT_MAP; inferred,
not published: a clean plane through three classes has RE near log2(3), i.e. 0.48-0.68 of the
maximum for 5-10 classes, a dominated plane much less; the paper's thresholds hold only for its
settings); for a
detector with a finite ``probability`` statistic that value; otherwise expit(score). Clipped to
DEFAULT_CLIP = [0.05, 0.95]: never a hard 0 or 1.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit

from xray.io import storage
from xray.results.sink import json_object, read_runs, read_table

log = logging.getLogger(__name__)

COMBINED = "combined"
FORMAT = "xray-calibrator"
FORMAT_VERSION = 2  # 2: training_models (model_id, model_digest) pairs; 1 still loads
READABLE_VERSIONS = (1, 2)
STACKER_VERSION = "stacker-1"
DEFAULT_VERSION = "default-map-1"
DEFAULT_ORDER = ("modelxray",)
DEFAULT_CLIP = (0.05, 0.95)
MODELXRAY_DEFAULT_MAP = {"centre": 0.45, "scale": 0.15}
C_GRID = (0.01, 0.1, 1.0, 10.0)
SELECTION_TOLERANCE = 0.01  # nats of cross-validated CE a richer candidate must gain (inferred)
EXCLUDED_STATS = {"seed", "num_planes", "resolution", "probability", "num_classes", "target",
                  "steps", "seconds"}
_EXCLUDED_SUFFIXES = ("_label", "_index", "_indices", "_labels", "_seed")


# ---------------------------------------------------------------------------------------------
# Per-model inputs


def row_probability(stats_json: Any) -> float:
    """The finite 'probability' statistic of a score row, else NaN."""
    try:
        p = float(json_object(stats_json).get("probability"))
    except (TypeError, ValueError):
        return math.nan
    return p if math.isfinite(p) else math.nan


def scalar_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalar statistics that may be features (see EXCLUDED_STATS)."""
    out = {}
    for key, value in stats.items():
        if key in EXCLUDED_STATS or key.endswith(_EXCLUDED_SUFFIXES):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def features_from_results(results: Mapping[str, Mapping[str, Any]],
                          num_classes: int | None) -> dict[str, float]:
    """Feature dict of one model from {detector: {"score": float, "stats": dict}} (ok results
    only; an absent detector is simply not in `results`)."""
    feats: dict[str, float] = {}
    if num_classes:
        feats["log2_num_classes"] = math.log2(max(int(num_classes), 2))
    for name, result in results.items():
        score = result.get("score")
        if score is None or not math.isfinite(float(score)):
            continue
        feats[f"{name}.score"] = float(score)
        for key, value in scalar_stats(result.get("stats") or {}).items():
            feats[f"{name}.{key}"] = value
    return feats


def _usable(scores: pd.DataFrame) -> pd.DataFrame:
    score = pd.to_numeric(scores["score"], errors="coerce")
    return scores[scores["status"].eq("ok") & np.isfinite(score.astype(float))]


def _latest(scores: pd.DataFrame) -> pd.DataFrame:
    """One usable row per (model_id, detector): the latest."""
    rows = _usable(scores).sort_values("finished_at", kind="stable")
    return rows.drop_duplicates(["model_id", "detector"], keep="last")


def model_results(scores: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """{model_id: {detector: {"score", "stats", "row"}}} from score rows (latest usable)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in _latest(scores[scores["detector"] != COMBINED]).to_dict("records"):
        out.setdefault(str(row["model_id"]), {})[str(row["detector"])] = {
            "score": float(row["score"]), "stats": json_object(row.get("stats_json")), "row": row}
    return out


# ---------------------------------------------------------------------------------------------
# The default map (no calibrator)


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


# ---------------------------------------------------------------------------------------------
# The stacker


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
        from xray.config import parse_config

        return parse_config(self.scan or {"detectors": {n: {} for n in self.detector_names}},
                            source=f"calibrator {self.id}")


def _training_frame(scores: pd.DataFrame, detectors: Sequence[str]
                    ) -> tuple[list[str], list[dict[str, float]], np.ndarray]:
    results = model_results(scores[scores["detector"].isin(detectors)])
    truth = scores.sort_values("finished_at").drop_duplicates("model_id", keep="last")
    ids, feats, y = [], [], []
    for row in truth.to_dict("records"):
        gt = row.get("gt_poisoned")
        if gt is None or (isinstance(gt, float) and math.isnan(gt)) or gt is pd.NA:
            continue
        k = row.get("num_classes")
        k = None if k is None or pd.isna(k) else int(k)
        ids.append(str(row["model_id"]))
        feats.append(features_from_results(
            {d: r for d, r in results.get(str(row["model_id"]), {}).items()}, k))
        y.append(1.0 if bool(gt) else 0.0)
    return ids, feats, np.asarray(y)


def candidate_models(names: Sequence[str], detectors: Sequence[str]) -> dict[str, list[int]]:
    """The feature subsets `fit` chooses among, simplest first: "prior" (no feature: the base
    rate), each detector alone (its score and missing indicator: Platt scaling of that
    detector), "scores" (every detector's score and indicator) and "all" (scores and scalar
    statistics). Subsets equal to an earlier one are dropped."""
    def columns(keep) -> list[int]:
        return [i for i, n in enumerate(names) if keep(n)]

    out: dict[str, list[int]] = {"prior": []}
    for d in detectors:
        out[d] = columns(lambda n, d=d: n in (f"{d}.score", f"{d}.missing"))
    out["scores"] = columns(lambda n: n.endswith((".score", ".missing")))
    out["all"] = list(range(len(names)))
    unique: dict[str, list[int]] = {}
    for name, cols in out.items():
        if name == "prior" or (cols and cols not in unique.values()):
            unique[name] = cols
    return unique


def _fit_predict(z_train: np.ndarray, y_train: np.ndarray, C: float | None,
                 z_test: np.ndarray) -> np.ndarray:
    """P(trojaned) of z_test from a logistic regression fitted on the training rows (C None, or
    no columns: the training rows' base rate)."""
    from sklearn.linear_model import LogisticRegression

    if C is None or z_train.shape[1] == 0:
        return np.full(len(z_test), y_train.mean())
    model = LogisticRegression(C=C, max_iter=2000).fit(z_train, y_train)
    return model.predict_proba(z_test)[:, 1]


def _folds(y: np.ndarray, seed: int):
    """Stratified k-fold with k = min(5, models per class); None when a class has < 2."""
    from sklearn.model_selection import StratifiedKFold

    k = min(5, int(y.sum()), int((1 - y).sum()))
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if k >= 2 else None


def _cv_probabilities(z: np.ndarray, y: np.ndarray, C: float | None, cv) -> np.ndarray:
    """Held-out P(trojaned) of every model, each from a fit on the other folds."""
    p = np.empty(len(y))
    for train, test in cv.split(z, y):
        p[test] = _fit_predict(z[train], y[train], C, z[test])
    return p


@dataclass
class _Selection:
    model: str                              # the chosen candidate
    C: float | None                         # its C (None: the base rate)
    figures: dict[str, tuple[float, float | None]]  # candidate -> (CV CE at its best C, C)
    p_cv: np.ndarray | None                 # the chosen candidate's held-out probabilities


def _select(z: np.ndarray, y: np.ndarray, candidates: Mapping[str, list[int]],
            grid: Sequence[float], *, model: str | None, tolerance: float,
            clip: tuple[float, float], seed: int) -> _Selection:
    """The model selection (see the module docstring): per candidate its best C by k-fold CE,
    then the simplest candidate within `tolerance` of the lowest CE. With fewer than 2 models
    of a class there is nothing to cross-validate: the simplest allowed candidate (`model`, else
    the base rate) at the first C of `grid`."""
    from xray.reduce import metrics as M

    cv = _folds(y, seed)
    if cv is None:
        name = model or "prior"
        c = grid[0] if candidates[name] else None
        return _Selection(name, c, {}, None)
    # per candidate, at its best C: (cv CE, candidate order, C, held-out probabilities)
    best: dict[str, tuple] = {}
    for order, (name, cols) in enumerate(candidates.items()):
        if model is not None and name != model:
            continue
        for c in ([None] if not cols else grid):
            p = np.clip(_cv_probabilities(z[:, cols], y, c, cv), *clip)
            ce = M.cross_entropy(y, p).value
            if name not in best or ce < best[name][0]:
                best[name] = (ce, order, c, p)
    lowest = min(t[0] for t in best.values())
    chosen = min((n for n, t in best.items() if t[0] <= lowest + tolerance),
                 key=lambda n: best[n][1])
    return _Selection(chosen, best[chosen][2], {n: (t[0], t[2]) for n, t in best.items()},
                      best[chosen][3])


def _nested_cv(z: np.ndarray, y: np.ndarray, candidates: Mapping[str, list[int]],
               grid: Sequence[float], *, model: str | None, tolerance: float,
               clip: tuple[float, float], seed: int) -> tuple[np.ndarray, int, list[str]]:
    """Held-out probabilities in which every outer fold's model was selected (`_select`, on
    inner folds) and fitted on the other outer folds only, so the selection cannot flatter
    them. Returns (probabilities, outer folds, the candidate chosen in each outer fold)."""
    outer = _folds(y, seed)
    p, chosen = np.empty(len(y)), []
    for train, test in outer.split(z, y):
        sel = _select(z[train], y[train], candidates, grid, model=model, tolerance=tolerance,
                      clip=clip, seed=seed)
        cols = candidates[sel.model]
        p[test] = _fit_predict(z[train][:, cols], y[train], sel.C, z[test][:, cols])
        chosen.append(sel.model)
    return np.clip(p, *clip), outer.get_n_splits(), chosen


def fit(scores: pd.DataFrame, *, detectors: Sequence[str] | None = None, C: float | None = None,
        model: str | None = None, tolerance: float = SELECTION_TOLERANCE,
        clip: tuple[float, float] = (0.01, 0.99),
        scan: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
        seed: int = 0) -> Calibrator:
    """Fit the stacker on the labelled models of a scores table (see the module docstring).
    model: one of `candidate_models` ("prior", a detector's name, "scores", "all"); None
    chooses the candidate and C with the lowest cross-validated cross-entropy; a candidate
    must beat every simpler one by more than `tolerance` (nats) to be chosen over it.
    train.cross_validated holds the nested cross-validated figures of this whole procedure;
    train.selection the (optimistic) figures the selection compared."""
    from threadpoolctl import threadpool_limits

    from xray.reduce import metrics as M

    scores = scores[scores["detector"] != COMBINED]
    present = sorted(set(_usable(scores)["detector"]))
    detectors = list(detectors) if detectors else present
    missing = sorted(set(detectors) - set(present))
    if missing:
        raise ValueError(f"no ok scores of detector(s) {missing} to calibrate; "
                         f"detectors with scores: {present}")
    if not detectors:
        raise ValueError("no ok detector scores to calibrate on")
    ids, feats, y = _training_frame(scores, detectors)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum()) if len(y) else 0
    if min(n_pos, n_neg) < 2:
        raise ValueError(f"calibration needs at least 2 trojaned and 2 clean labelled models; "
                         f"found {n_pos} trojaned and {n_neg} clean")
    # every (model_id, model_digest) of a labelled model's rows: the leakage check's list
    labelled = scores[scores["model_id"].astype(str).isin(ids)]
    training_models = sorted({(str(m), str(g)) for m, g in
                              zip(labelled["model_id"], labelled["model_digest"])})

    names = sorted({k for f in feats for k in f})
    names = [k for k in names if sum(k in f for f in feats) >= len(feats) / 2]
    names += [f"{d}.missing" for d in detectors]
    units = scores[scores["detector"].isin(detectors)].drop_duplicates("detector", keep="last")
    inputs = [{"name": str(r["detector"]), "version": str(r["detector_version"]),
               "config_hash": str(r["config_hash"])}
              for r in units.sort_values("detector").to_dict("records")]
    draft = Calibrator(detectors=inputs,
                       features=names, impute=[0.0] * len(names), mean=[0.0] * len(names),
                       scale=[1.0] * len(names), coef=[0.0] * len(names), intercept=0.0, C=1.0,
                       clip=tuple(clip))
    x = draft.matrix(feats)
    with warnings.catch_warnings():  # an all-missing column: imputed with 0 below
        warnings.simplefilter("ignore", RuntimeWarning)
        impute = np.nanmean(x, axis=0)
    impute = np.where(np.isnan(impute), 0.0, impute)
    x = np.where(np.isnan(x), impute[None, :], x)
    std = x.std(axis=0)
    keep = (std > 1e-12) | np.array([n.endswith(".missing") for n in names])
    names = [n for n, k in zip(names, keep) if k]
    x, impute, std = x[:, keep], impute[keep], std[keep]
    mean = x.mean(axis=0)
    scale = np.where(std > 1e-12, std, 1.0)
    z = (x - mean) / scale

    candidates = candidate_models(names, detectors)
    if model is not None and model not in candidates:
        raise ValueError(f"calibrator model {model!r}: choose one of {sorted(candidates)}")
    grid = [float(C)] if C is not None else list(C_GRID)
    how = dict(model=model, tolerance=tolerance, clip=tuple(clip), seed=seed)
    # Hundreds of fits of a few dozen rows: BLAS threads only add start-up cost (5-10x slower
    # on a busy machine), so one thread.
    with threadpool_limits(limits=1):
        sel = _select(z, y, candidates, grid, **how)
        # the figure to report: the same selection repeated inside each outer fold
        p_nested, outer_folds, fold_choices = _nested_cv(z, y, candidates, grid, **how)

    cols = candidates[sel.model]
    names, impute, mean, scale = ([v[i] for i in cols] for v in (names, impute, mean, scale))
    z = z[:, cols]
    C = float(sel.C if sel.C is not None else (C if C is not None else 1.0))
    if cols:
        from sklearn.linear_model import LogisticRegression

        fitted = LogisticRegression(C=C, max_iter=2000).fit(z, y)
        coef, intercept = fitted.coef_[0].tolist(), float(fitted.intercept_[0])
    else:  # the base rate
        coef, intercept = [], float(np.log(y.mean() / (1.0 - y.mean())))
    p_in = np.clip(expit(z @ np.asarray(coef) + intercept), *clip)
    train = {"n": len(y), "n_poisoned": n_pos, "n_clean": n_neg, "model": sel.model,
             "selection": {name: {"cross_entropy": ce, "C": c}
                           for name, (ce, c) in sel.figures.items()},
             "in_sample": {"cross_entropy": M.cross_entropy(y, p_in).value,
                           "roc_auc": M.roc_auc(y, p_in).value}, **dict(provenance or {})}
    train["cross_validated"] = {
        "nested": True, "folds": outer_folds, "chosen_per_fold": fold_choices,
        "cross_entropy": M.cross_entropy(y, p_nested).value,
        "roc_auc": M.roc_auc(y, p_nested).value}
    return Calibrator(detectors=draft.detectors, features=names, impute=list(map(float, impute)),
                      mean=list(map(float, mean)), scale=list(map(float, scale)), coef=coef,
                      intercept=intercept, C=C, clip=tuple(clip),
                      scan=dict(scan or {}), train=train,
                      created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      training_models=[list(t) for t in training_models])


def _run_scan_config(out_uri: str, run_id: str | None) -> dict[str, Any]:
    runs = read_runs(out_uri, run_id)
    if not len(runs):
        return {}
    raw = json.loads(runs.iloc[-1]["config_json"])
    return {k: raw[k] for k in ("seed", "examples_per_class", "detectors") if k in raw}


def calibrate(out_uri: str, train_run: str | None, *, artifact_uri: str | None = None,
              detectors: Sequence[str] | None = None, C: float | None = None,
              model: str | None = None) -> tuple[Calibrator, str]:
    """`xray calibrate`: fit on run `train_run` of `out_uri` (all runs when None) and save the
    artifact (default <out>/calibration/<run or all>-<id>.json). Returns (calibrator, uri)."""
    scores = read_table(out_uri, "scores", run_id=train_run)
    if not len(scores):
        raise ValueError(f"no scores under {out_uri}"
                         + (f" for run {train_run}" if train_run else ""))
    cal = fit(scores, detectors=detectors, C=C, model=model,
              scan=_run_scan_config(out_uri, train_run),
              provenance={"out": str(out_uri), "run": train_run})
    name = f"{train_run or 'all'}-{cal.id}.json"
    uri = artifact_uri or storage.join(out_uri, "calibration", name)
    cal.save(uri)
    return cal, uri


# ---------------------------------------------------------------------------------------------
# Combined rows for the reducer


def combined_rows(scores: pd.DataFrame, calibrator: Calibrator | None = None) -> pd.DataFrame:
    """One `scores`-schema row per model of detector "combined": score = stats.probability =
    the stacker's probability (or the default map without a calibrator). A model with no usable
    detector score gets a status "error" row saying so (missing, never filled in).

    With a calibrator, stats.trained_on says whether the model is one of its training models
    (`Calibrator.trained_on`; None: the artifact cannot tell). Such rows are marked, not
    refused: scoring a corpus that includes the training round is legitimate, and the readers
    (summary, report, score-testset) say which figures are in-sample."""
    from xray.results.schema import SCORES

    scores = scores[scores["detector"] != COMBINED]
    if not len(scores):
        return SCORES.empty_table().to_pandas()
    if calibrator is not None:
        scores = _matching(scores, calibrator)
    results = model_results(scores)
    latest = scores.sort_values("finished_at", kind="stable")
    latest = latest.drop_duplicates("model_id", keep="last")
    version = STACKER_VERSION if calibrator is not None else DEFAULT_VERSION
    config_hash = calibrator.id if calibrator is not None else "default-map"
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for base in latest.to_dict("records"):
        mid = str(base["model_id"])
        res = results.get(mid, {})
        k = base.get("num_classes")
        k = None if k is None or pd.isna(k) else int(k)
        if calibrator is not None:
            res = {d: r for d, r in res.items() if d in calibrator.detector_names}
        inputs = {d: r["score"] for d, r in res.items()}
        row = {key: base.get(key) for key in SCORES.names}
        row.update(detector=COMBINED, detector_version=version, config_hash=config_hash,
                   predicted_target=None, worker="", finished_at=now,
                   model_digest=str(res[next(iter(res))]["row"]["model_digest"]) if res
                   else str(base["model_digest"]),
                   run_id=str(max((r["row"]["run_id"] for r in res.values()),
                                  default=base["run_id"])),
                   seconds=float(sum(float(r["row"].get("seconds") or 0.0) for r in res.values())))
        if not res:
            row.update(status="error", score=None, error="no detector has an ok score for this "
                       "model", stats_json=json.dumps({"inputs": {}}))
        else:
            if calibrator is not None:
                p, how = calibrator.predict_results(res, k), f"stacker {calibrator.id}"
            else:
                p, best = default_combined(res, k)
                how = f"default map of {best}"
            missing = sorted(set(calibrator.detector_names if calibrator else res) - set(res))
            stats = {"probability": p, "source": how, "inputs": inputs, "missing": missing}
            if calibrator is not None:
                stats["trained_on"] = _trained_on(calibrator, mid, res)
            row.update(status="ok", error=None, score=p,
                       stats_json=json.dumps(stats, sort_keys=True))
        rows.append(row)
    return pd.DataFrame(rows, columns=SCORES.names)


def _trained_on(calibrator: Calibrator, model_id: str,
                results: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """Whether the model, as any of its input rows has it, is a training model."""
    flags = {calibrator.trained_on(model_id, r["row"]["model_digest"]) for r in results.values()}
    return True if True in flags else (None if None in flags else False)


def trained_on_flag(stats_json: Any) -> bool | None:
    """A score row's trained_on mark, as the summary, report and score-testset read it: True
    (a training model of the calibrator that made the row), None (a calibrator that cannot
    tell), False (not one, or a row no calibrator made)."""
    stats = json_object(stats_json)
    if "trained_on" not in stats:
        return False
    return stats["trained_on"] if isinstance(stats["trained_on"], bool) else None


def _matching(scores: pd.DataFrame, calibrator: Calibrator) -> pd.DataFrame:
    """Rows of the detectors the calibrator knows, preferring its version / config hash."""
    parts = []
    for d in calibrator.detectors:
        rows = scores[scores["detector"] == d["name"]]
        same = rows[(rows["detector_version"] == d["version"])
                    & (rows["config_hash"] == d["config_hash"])]
        if len(rows) and not len(same):
            log.warning("calibrator %s was trained on %s %s [%s]; scoring rows of another "
                        "version / config", calibrator.id, d["name"], d["version"],
                        d["config_hash"])
        parts.append(same if len(same) else rows)
    return pd.concat(parts) if parts else scores.iloc[0:0]


def with_combined(scores: pd.DataFrame, calibrator: Calibrator | None = None) -> pd.DataFrame:
    """`scores` plus the combined detector's rows: what summarize / render_report take to
    report the combined detector beside the single ones."""
    combined = combined_rows(scores, calibrator)
    if not len(combined):
        return scores
    return pd.concat([scores[scores["detector"] != COMBINED], combined], ignore_index=True)


def describe(cal: Calibrator) -> str:
    lines = [f"calibrator {cal.id} ({STACKER_VERSION}, model {cal.train.get('model', 'all')!r}, "
             f"C={cal.C:g}) on {cal.train.get('n')} models ({cal.train.get('n_poisoned')} "
             "trojaned)"]
    for name, sel in cal.train.get("selection", {}).items():
        lines.append(f"  candidate {name:<24s} selection CE {sel['cross_entropy']:.4f}")
    if "in_sample" in cal.train:
        m = cal.train["in_sample"]
        lines.append(f"  in sample: CE {m['cross_entropy']:.4f}  ROC-AUC {m['roc_auc']:.4f}")
    if "cross_validated" in cal.train:
        m = cal.train["cross_validated"]
        what = (f"nested, {m.get('folds')} outer folds, selection repeated in each"
                if m.get("nested") else "NOT nested: flattered by the selection")
        lines.append(f"  cross-validated ({what}): CE {m['cross_entropy']:.4f}  "
                     f"ROC-AUC {m['roc_auc']:.4f}")
    n_train = len(cal.training_models) if cal.training_models is not None else "unknown"
    lines.append(f"  training models (model_id, digest) remembered: {n_train}")
    for name, c in sorted(zip(cal.features, cal.coef), key=lambda t: -abs(t[1])):
        lines.append(f"  {name:<32s} {c:+.4f}")
    return "\n".join(lines)
