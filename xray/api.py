"""The Python API, three verbs (exported lazily as `xray.scan`, `xray.score`,
`xray.read_scores`; `import xray` imports none of this):

    summary = xray.scan("demo-out/round", "out", detectors=["mmbd"], preset="small")
    scores = xray.read_scores("out")                         # one row per model x detector
    rows = xray.score(net, (x, y), detectors=["mmbd"])       # one model in memory, no Ray

Each is a thin front on what the command line runs: `scan` is `xray scan` (xray.runner.run_scan,
then the summary table), `score` is `xray.scanning.scan_model` / `scan_loaded` on one model,
`read_scores` is the de-duplicating reader with the probability column
(xray.reduce.summary.load_scores). Detector settings
take the shapes of a scan config (xray.config): a list of names, or name -> {preset, params}.
Pickled models load only with `allow_pickle=True` passed here: never from a config.
"""
from __future__ import annotations

import inspect
import json
import os
import posixpath
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # types only: these import torch / Ray
    import pandas as pd
    import torch

    from xray.config import ScanConfig
    from xray.pipeline import CascadeSummary
    from xray.runner.scan_run import RunSummary

Detectors = str | Sequence[str] | Mapping[str, Any] | None


def make_config(config: Any = None, detectors: Detectors = None, preset: str | None = None, *,
                allow_pickle: bool = False, **settings: Any) -> ScanConfig:
    """A ScanConfig from what the API takes. config: None (the defaults), a YAML file's URI, a
    dict in the config file's shape, or a ScanConfig (its allow_pickle is not carried over).
    detectors: names (a list, or "a,b") choosing from the config, or a dict name -> {preset,
    params} replacing its `detectors`. preset: applied to every detector that has it.
    settings: config keys (seed, device, examples_per_class, model_time_limit_s); None = keep.
    """
    from xray.config import ScanConfig, parse_config, with_preset

    names: list[str] | None = None
    if isinstance(detectors, str):
        names = [d.strip() for d in detectors.split(",") if d.strip()]
    elif isinstance(detectors, Mapping):
        settings["detectors"] = dict(detectors)
    elif detectors is not None:
        names = [str(d) for d in detectors]
    stored = isinstance(config, ScanConfig)  # its recorded allow_pickle is dropped
    if config is None:
        raw, source = {}, "<defaults>"
    elif stored:
        raw, source = json.loads(config.to_json()), "ScanConfig"
    elif isinstance(config, Mapping):
        raw, source = dict(config), "config"
    elif isinstance(config, (str, os.PathLike)):
        import yaml

        from xray.io import storage

        source = str(config)
        try:
            raw = yaml.safe_load(storage.read_text(source)) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {source} not found") from None
    else:
        raise TypeError(f"config: expected a file URI, a dict or a ScanConfig, got "
                        f"{type(config).__name__}")
    raw = {**raw, **{k: v for k, v in settings.items() if v is not None}}
    made = parse_config(raw, source=source, detector_names=names, allow_pickle=allow_pickle,
                        stored=stored)
    return with_preset(made, preset) if preset else made


def scan(manifest: str | os.PathLike[str], out: str | os.PathLike[str], detectors: Detectors = None,
         preset: str | None = None, config: Any = None, *, allow_pickle: bool = False,
         **runner_options: Any) -> "RunSummary | CascadeSummary":
    """Scan every model of a manifest (or round directory) into the output folder `out`, as
    `xray scan` does: on Ray (a local instance unless `address=` names a cluster), skipping
    models already scored with the same configuration, then writing out/summary. Returns the
    run's RunSummary (run_id, models_scanned, failures, status_counts, seconds, ...); for a
    config with stages (a cascade), xray.pipeline.CascadeSummary (its stages' RunSummary,
    detector-seconds, and the stage that decided each model).

    detectors, preset, config: as in `make_config` (default: Model X-ray). allow_pickle: load
    whole-module pickles (they run code) — only this argument turns it on.
    runner_options: xray.runner.run_scan's options (address, num_actors, num_cpus_per_actor,
    num_gpus_per_actor, stack_size, max_retries, retry_errors, flush_seconds, root,
    show_progress (default False here), run_id, on_result, ...).

    >>> summary = xray.scan("demo-out/round", "out", detectors=["mmbd"], preset="small")
    >>> summary.models_scanned, summary.failures
    (16, 0)
    """
    from xray.reduce.summary import refresh_summary
    from xray.runner import run_scan

    accepted = set(inspect.signature(run_scan).parameters) - {"manifest_uri", "out_uri", "config"}
    unknown = sorted(set(runner_options) - accepted)
    if unknown:
        raise TypeError(f"xray.scan: unknown option {unknown[0]!r}; runner options: "
                        f"{', '.join(sorted(accepted))}")
    built = make_config(config, detectors, preset, allow_pickle=allow_pickle)
    options = {"show_progress": False, **runner_options}
    if built.stages:
        from xray.pipeline import run_cascade

        cascade = run_cascade(str(manifest), str(out), built, **options)
        refresh_summary(str(out))
        return cascade
    summary = run_scan(str(manifest), str(out), built, **options)
    refresh_summary(str(out))
    return summary


def read_scores(out: str | os.PathLike[str], run_id: str | None = None) -> pd.DataFrame:
    """The scores table of an output folder (of one run, or of all): one row per model x
    detector x detector version x config (the latest ok row of each; see
    xray.results.sink.dedupe_scores), with a `probability` column beside `score` (every
    detector on one [0, 1] scale; docs/OUTPUTS.md says how it is computed).

    >>> scores = xray.read_scores("out")
    >>> scores.pivot(index="model_id", columns="detector", values="probability")
    """
    from xray.reduce.summary import load_scores

    return load_scores(str(out), run_id=run_id, probability=True)


def score(model_or_uri: Any, examples: Any = None, detectors: Detectors = None,
          preset: str | None = None, num_classes: int | None = None, seed: int = 0,
          device: str | None = None, *, model_id: str | None = None,
          mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
          allow_pickle: bool = False, **fields: Any) -> pd.DataFrame:
    """Score one model with the detectors, in this process (no Ray, nothing written): the rows
    a scan would write to the scores table, one per detector, as a DataFrame (status, score,
    predicted_target, stats_json, seconds, ...). A detector that fails gives a row with
    status "error" and its error text ("not_applicable" and the reason for one that does not
    apply to the model, such as BAN without BatchNorm), as in a scan.

    model_or_uri, examples:
    * an `nn.Module` and examples (x, y): x float (N, C, H, W) in [0, 1], y class labels. The
      model takes that pixel-space input; mean / std: a normalisation to put in front of it
      (and the one Model X-ray works in). num_classes: default, the model's output width.
      It is put in eval mode (its mode restored after) on `device` (default: where it is).
    * a manifest row (a dict of manifest fields), a ModelRecord, or a model file's URI with the
      other manifest fields as keywords (architecture=, input_shape=, format= (guessed for
      .safetensors), mean=, std=, preprocessing=, ...); examples: the clean examples' folder
      (default: the row's examples_uri) or (x, y) tensors. Relative paths are read from the
      working directory. Loaded as a scan loads it (pickles only with allow_pickle=True).

    detectors, preset: as in `make_config` (default: Model X-ray); seed: the scan's seed.

    >>> rows = xray.score(net, (x, y), detectors=["mmbd"], preset="small")
    >>> rows[["detector", "status", "score"]]
    >>> xray.score("demo-out/round/id-00000008/model.safetensors",
    ...            "demo-out/round/id-00000008/clean_example_data", detectors=["mmbd"],
    ...            architecture="mntd_mnist_cnn", num_classes=10, input_shape=(3, 32, 32))
    """
    import pyarrow as pa
    import torch

    from xray.results.schema import SCORES
    from xray.scanning import scan_loaded, scan_model

    if isinstance(model_or_uri, torch.nn.Module):
        if fields:
            raise TypeError(f"xray.score: {sorted(fields)[0]!r} describes a model file; "
                            "an nn.Module takes none")
        record, net, data = _in_memory(model_or_uri, examples, num_classes, model_id, mean,
                                       std, device)
        config = make_config(None, detectors, preset, seed=seed, device=str(data.x.device))
        built = [d.build() for d in config.detectors]
        was_training = net.training
        try:
            rows = scan_loaded(record, net.eval(), data, built, config)["scores"]
        finally:
            net.train(was_training)
    else:
        record = _record(model_or_uri, examples, num_classes, model_id, mean, std, fields)
        config = make_config(None, detectors, preset, seed=seed, device=device,
                             allow_pickle=allow_pickle)
        built = [d.build() for d in config.detectors]
        if isinstance(examples, (tuple, list)):
            rows = _score_record_with(record, examples, built, config)
        else:
            rows = scan_model(record, built, config)["scores"]
    return pa.Table.from_pylist(rows, schema=SCORES).to_pandas()


# ---------------------------------------------------------------------------------------------
# score's inputs


def _tensors(examples: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if not isinstance(examples, (tuple, list)) or len(examples) != 2:
        raise TypeError("examples: expected (x, y): x (N, C, H, W) in [0, 1], y labels")
    x = torch.as_tensor(examples[0]).detach().float()
    y = torch.as_tensor(examples[1]).detach().long().reshape(-1)
    if x.ndim != 4 or len(x) != len(y) or not len(y):
        raise ValueError(f"examples: x must be (N, C, H, W) with one label each; got x "
                         f"{tuple(x.shape)}, y {tuple(y.shape)}")
    return x, y


def _in_memory(model: torch.nn.Module, examples: Any, num_classes: int | None,
               model_id: str | None, mean: Sequence[float], std: Sequence[float],
               device: str | None) -> tuple[Any, torch.nn.Module, Any]:
    """(record naming it, the network as scanned, ScanData) for an in-memory model."""
    import torch

    from xray.detectors.base import ScanData
    from xray.io.records import ModelRecord
    from xray.models.device import resolve_device
    from xray.models.normalize import Normalized

    if examples is None:
        raise TypeError("xray.score: an in-memory model needs examples=(x, y)")
    x, y = _tensors(examples)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    plain = mean == (0.0,) and std == (1.0,)
    net = model if plain else Normalized(model, mean, std)
    if device is not None:
        where = resolve_device(device)
    else:
        where = next((p.device for p in model.parameters()), torch.device("cpu"))
    net = net.to(where)
    x, y = x.to(where), y.to(where)
    if num_classes is None:
        was_training = net.training
        with torch.no_grad():
            num_classes = int(net.eval()(x[:1]).shape[-1])
        net.train(was_training)
    record = ModelRecord(model_id=model_id or type(model).__name__, uri="<in-memory>",
                         format="state_dict", architecture=type(model).__name__,
                         num_classes=int(num_classes), input_shape=tuple(x.shape[1:]),
                         mean=mean, std=std)
    data = ScanData(x=x, y=y, num_classes=int(num_classes), mean=mean, std=std)
    return record, net, data


def _record(model: Any, examples: Any, num_classes: int | None, model_id: str | None,
            mean: Sequence[float], std: Sequence[float], fields: dict[str, Any]) -> Any:
    """The ModelRecord of a manifest row, a ModelRecord or a model URI plus fields (checked as
    a manifest row is; relative URIs against the working directory)."""
    from xray.io.records import ModelRecord
    from xray.io.rows import record_from_row

    if isinstance(model, ModelRecord):
        row = model.to_row()
    elif isinstance(model, Mapping):
        row = dict(model)
    elif isinstance(model, (str, os.PathLike)):
        uri = str(model)
        # a round's id-*/model.pt is named by its folder, a lone file by its name
        row = {"uri": uri, "model_id": posixpath.basename(posixpath.dirname(uri))
               or posixpath.basename(uri)}
        if uri.lower().endswith(".safetensors"):
            row["format"] = "safetensors"
    else:
        raise TypeError(f"xray.score: expected an nn.Module, a manifest row, a ModelRecord or a "
                        f"model URI, got {type(model).__name__}")
    given = {"model_id": model_id, "num_classes": num_classes,
             "mean": None if tuple(mean) == (0.0,) else list(mean),
             "std": None if tuple(std) == (1.0,) else list(std),
             "examples_uri": str(examples) if isinstance(examples, (str, os.PathLike)) else None}
    row.update({k: v for k, v in {**given, **fields}.items() if v is not None})
    return record_from_row(row, file="xray.score", row_number=None, base=os.getcwd())


def _score_record_with(record: Any, examples: Any, detectors: list[Any],
                       config: Any) -> list[dict[str, Any]]:
    """A record's model file, loaded as a scan loads it, scored on the given (x, y)."""
    from xray.detectors.base import ScanData
    from xray.io.model_loading import load_model
    from xray.models.device import resolve_device
    from xray.scanning import model_fingerprint, scan_loaded

    device = resolve_device(config.device)
    x, y = _tensors(examples)
    net = load_model(record, allow_pickle=config.allow_pickle, device=str(device))
    data = ScanData(x=x.to(device), y=y.to(device), num_classes=record.num_classes,
                    mean=tuple(record.mean), std=tuple(record.std))
    return scan_loaded(record, net, data, detectors, config,
                       digest=model_fingerprint(record.uri))["scores"]
