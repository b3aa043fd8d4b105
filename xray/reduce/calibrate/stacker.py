"""Fitting the stacker: the candidate feature subsets, their selection by cross-validated
cross-entropy, the nested figure that is reported, and `xray calibrate` (see the package
docstring)."""
from __future__ import annotations

import datetime as dt
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from xray.io import storage
from xray.reduce import metrics as M
from xray.reduce.calibrate.artifact import STACKER_VERSION, Calibrator
from xray.reduce.calibrate.features import (DERIVED_DETECTORS, TARGET_AGREEMENT, _usable,
                                            features_from_results, model_results)
from xray.results.sink import read_runs, read_table

C_GRID = (0.01, 0.1, 1.0, 10.0)
SELECTION_TOLERANCE = 0.01  # nats of cross-validated CE a richer candidate must gain (inferred)


def _training_frame(scores: pd.DataFrame, detectors: Sequence[str]
                    ) -> tuple[list[str], list[dict[str, float]], np.ndarray]:
    results = model_results(scores[scores["detector"].isin(detectors)])
    # In model order, not finishing order: the cross-validation folds follow the rows, and the
    # same scores must give the same calibrator however the actors happened to finish.
    truth = (scores.sort_values("finished_at").drop_duplicates("model_id", keep="last")
             .sort_values("model_id", kind="stable"))
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
    detector), "agreement" (target_agreement alone) and "<detector>+agreement" where the
    feature exists, "scores" (every detector's score and indicator, and the agreement) and
    "all" (those and scalar statistics). Subsets equal to an earlier one are dropped."""
    def columns(keep) -> list[int]:
        return [i for i, n in enumerate(names) if keep(n)]

    out: dict[str, list[int]] = {"prior": []}
    for d in detectors:
        out[d] = columns(lambda n, d=d: n in (f"{d}.score", f"{d}.missing"))
    if TARGET_AGREEMENT in names:
        out["agreement"] = columns(lambda n: n == TARGET_AGREEMENT)
        for d in detectors:
            out[f"{d}+agreement"] = columns(
                lambda n, d=d: n in (f"{d}.score", f"{d}.missing", TARGET_AGREEMENT))
    out["scores"] = columns(lambda n: n.endswith((".score", ".missing")) or n == TARGET_AGREEMENT)
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
    if C is None or z_train.shape[1] == 0:
        return np.full(len(z_test), y_train.mean())
    model = LogisticRegression(C=C, max_iter=2000).fit(z_train, y_train)
    return model.predict_proba(z_test)[:, 1]


def _folds(y: np.ndarray, seed: int):
    """Stratified k-fold with k = min(5, models per class); None when a class has < 2."""
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
    scores = scores[~scores["detector"].isin(DERIVED_DETECTORS)]
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
