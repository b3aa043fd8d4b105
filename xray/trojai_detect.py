"""The TrojAI detector entrypoint (rounds 1-4): one model in, one probability out.

    trojai-detector --model_filepath M --result_filepath R --scratch_dirpath S \\
        --examples_dirpath E [--config FILE] [--calibrator FILE] [--time-budget SECONDS] \\
        [--allow-pickle] [--allow-training-models] [--round r1|r2|r3|r4] [--format FORMAT] \\
        [--device DEVICE]
    xray trojai-detect ...                 (the same command)
    python -m xray.trojai_detect ...       (the same command; what the containers run)

Writes one float in [0, 1] (probability that the model is trojaned) on the first line of R,
which is what the harness reads (ref: trojai-test-harness; docs/algorithms/trojai-format.md
"Detector entrypoint"). Guarantees:

* R is always written. It holds 0.5 from the first moment (so even a hard kill leaves a valid
  answer), and is overwritten with the estimate at the end. A broken model file, a missing or
  empty examples folder, a pickle without --allow-pickle, a failing detector or a time budget too
  short to finish all end in 0.5 (or the best estimate so far) with the reason on stderr; the
  exit status is 0 when R holds an estimate from at least one detector, 1 when it holds the 0.5
  fallback.
* The model is never unpickled in this (driver) process. A worker process
  (`python -m xray.trojai_detect --worker S/job.json`) loads the model and runs the detectors,
  appending each detector's result to S/progress.jsonl as it finishes. TrojAI's model.pt files
  are whole-module pickles (they run code when loaded): they load only with --allow-pickle
  (the container entrypoint passes it: the container is the sandbox).
* S/xray-detect.json says what ran: per configured detector its status (ok; error, timeout or
  not_applicable with the reason; timeout also for a detector the budget never reached),
  score, seconds and stats (the optimising detectors' `steps` among them), and how the
  probability came about.
* Temporary files go to S only: the job file and the progress file, and the worker runs with
  TMPDIR / TMP / TEMP, XDG_CACHE_HOME, MPLCONFIGDIR and TORCH_HOME pointing into S.
* --time-budget (default 600 s, the harness's per-model allowance) is counted from the start of
  this process. The worker is killed `margin` before its end; each detector is given what is
  left until then, less xray.scanning.stop_margin, as ctx.deadline (seconds left), so a detector
  that loops stops with what it has before the kill; R then holds the estimate from the
  detectors that finished (through the calibrator, which treats the others as missing, or the
  default map), else 0.5.

Detectors: --config (a scan config YAML: detectors with preset / params, seed,
examples_per_class), else the calibrator's training config, else DEFAULT_CONFIG (`weights`,
the final layer alone, about a millisecond; then Model X-ray, small preset: 4 planes of 32 x 32
points, about 4,100 forwards, a couple of minutes for a 224 x 224 resnet18 on 2 CPU cores; see
bench/trojai.py). Probability: the calibrator's (--calibrator,
from `xray calibrate`), else the documented default map of xray.reduce.calibrate. A model the
calibrator was trained on (the same folder name as model_id and the same file sha256 as digest)
gets 0.5 and the reason, since its probability would be in-sample; --allow-training-models
scores it anyway and S/xray-detect.json says `in_training: true`.

Model facts: a config.json beside M (TrojAI r2-4 or an xray export) gives the preprocessing and
input shape; otherwise they are inferred from the examples (inferred, not in the harness): 256 x
256 PNGs -> rounds 2-4 (centre crop 224, x / 255), 224 x 224 -> round 1 (BGR, per-image
min-max), any other size -> that size, x / 255; --round forces a round's preprocessing. The
class count is the width of the model's output. The format follows the file name (.safetensors,
.torchscript.pt / .ts) and is otherwise a whole-module pickle.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import click
import yaml

from xray import cli_args
from xray.io.records import MODEL_FORMATS, ModelRecord
from xray.jsonsafe import json_safe

STARTED = time.monotonic()  # this module's import: the process's start, in a fresh process
# A command invoked within this many seconds of the import runs in a fresh process (the
# harness's case): its budget counts from the process's start, imports included. Later (a
# long-lived process: tests, a notebook calling the command) it counts from the call.
FRESH_PROCESS_S = 30.0
DEFAULT_BUDGET = 600.0
FALLBACK = 0.5
MIN_BUDGET = 2.0
# weights first: data-free, about a millisecond, and the default map's first choice
# (xray.reduce.calibrate.DEFAULT_ORDER); Model X-ray after it, within the time budget.
DEFAULT_CONFIG: dict[str, Any] = {"seed": 0, "detectors": {"weights": {},
                                                          "modelxray": {"preset": "small"}}}
JOB_FILE, PROGRESS_FILE, RECORD_FILE = "job.json", "progress.jsonl", "xray-detect.json"
ROUNDS = ("r1", "r2", "r3", "r4")


def margin(budget: float) -> float:
    """Seconds kept back at the end of the budget to stop the worker and write R."""
    return min(10.0, max(0.5, 0.02 * budget))


@dataclass
class Outcome:
    probability: float
    estimated: bool                      # True when at least one detector result went into it
    reason: str                          # how the probability came about, or why it is 0.5
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    in_training: bool | None = None      # the model is one the calibrator was fitted on

    @property
    def exit_code(self) -> int:
        return 0 if self.estimated else 1


def _write_result(path: str, p: float) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{p!r}\n")


def _model_format(path: str, given: str | None) -> str:
    if given:
        return given
    name = os.path.basename(path).lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".torchscript.pt", ".ts")):
        return "torchscript"
    return "pickle"


def _has_examples(folder: str) -> bool:
    pattern = re.compile(r"^class_(\d+)_example_(\d+)\.png$", re.IGNORECASE)
    return any(pattern.match(n) for n in os.listdir(folder))


def _read_progress(path: str) -> tuple[dict[str, Any], list[str], int | None,
                                        dict[str, dict[str, Any]], dict[str, Any]]:
    """(results of the detectors that finished, error messages, class count, per-detector
    records {name: {status, score, seconds, stats, error}} of every detector that ended, the
    worker's plan: {detectors: names it planned to run, model_id, model_digest})."""
    results, errors, k, records, plan = {}, [], None, {}, {"detectors": []}
    if not os.path.exists(path):
        return results, errors, k, records, plan
    with open(path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if event.get("event") == "plan":
                plan = event
            elif event.get("event") == "result":
                results[event["detector"]] = {"score": event["score"], "stats": event["stats"],
                                              "target": event.get("target")}
                k = event.get("num_classes", k)
                records[event["detector"]] = {
                    "status": "ok", "score": event["score"], "seconds": event.get("seconds"),
                    "stats": event["stats"], "error": None}
            elif event.get("event") in ("error", "detector_error"):
                errors.append(event["message"])
                if event.get("detector"):
                    records[event["detector"]] = {
                        "status": event.get("status", "error"), "score": None,
                        "seconds": event.get("seconds"), "stats": {},
                        "error": event["message"]}
    return results, errors, k, records, plan


def _write_record(scratch: str, planned: list[str], records: dict[str, Any],
                  outcome: "Outcome", timed_out: bool) -> None:
    """S/xray-detect.json: what ran and how the probability came about (see module docstring).
    A planned detector that never ended is a timeout when the budget ran out, else an error (the
    worker died). Written to a temporary name and renamed: a reader never sees half a file."""
    detectors = {}
    for name in planned + [n for n in records if n not in planned]:
        detectors[name] = records.get(name) or {
            "status": "timeout" if timed_out else "error", "score": None, "seconds": None,
            "stats": {}, "error": "not finished within the time budget" if timed_out
            else "the worker stopped before this detector ended"}
    body = {"probability": outcome.probability, "estimated": outcome.estimated,
            "reason": outcome.reason, "seconds": outcome.seconds,
            "in_training": outcome.in_training, "detectors": detectors}
    path = os.path.join(scratch, RECORD_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(json_safe(body), f, indent=1)  # detectors in run order
    os.replace(path + ".tmp", path)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


def detect(model_filepath: str, result_filepath: str, scratch_dirpath: str,
           examples_dirpath: str, *, config: str | None = None, calibrator: str | None = None,
           time_budget: float = DEFAULT_BUDGET, allow_pickle: bool = False,
           round: str | None = None, model_format: str | None = None, device: str = "auto",
           allow_training_models: bool = False, started: float | None = None) -> Outcome:
    """Run the entrypoint's work; R is written whatever happens (see the module docstring).
    started: the time.monotonic() the budget counts from (default: this call)."""
    started = time.monotonic() if started is None else started
    deadline = started + float(time_budget)
    _write_result(result_filepath, FALLBACK)

    def fallback(reason: str, results: dict | None = None) -> Outcome:
        _write_result(result_filepath, FALLBACK)
        return Outcome(FALLBACK, False, reason, results or {}, time.monotonic() - started)

    if not time_budget or time_budget < MIN_BUDGET:
        return fallback(f"time budget of {time_budget:g} s is too short to load a model "
                        f"(minimum {MIN_BUDGET:g} s)")
    if not os.path.isfile(model_filepath):
        return fallback(f"model file {model_filepath} does not exist")
    if not os.path.isdir(examples_dirpath):
        return fallback(f"examples folder {examples_dirpath} does not exist")
    if not _has_examples(examples_dirpath):
        return fallback(f"examples folder {examples_dirpath} holds no class_<c>_example_<i>.png")
    fmt = _model_format(model_filepath, model_format)
    if fmt == "pickle" and not allow_pickle:
        return fallback(f"{model_filepath} is a whole-module pickle: loading it runs arbitrary "
                        "code from the file. It is loaded only with --allow-pickle "
                        "(allow_pickle=True), for models you trust or inside a sandbox.")
    cal_dict = None
    if calibrator:
        try:
            with open(calibrator) as f:
                cal_dict = json.load(f)
        except (OSError, ValueError) as e:
            return fallback(f"cannot read calibrator {calibrator}: {e}")
    if config:
        try:
            with open(config) as f:
                scan_config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            return fallback(f"cannot read config {config}: {e}")
        if isinstance(scan_config, dict) and "allow_pickle" in scan_config:
            return fallback(f"config {config}: allow_pickle is not a config setting: pickle "
                            "loading runs the file's code, so only --allow_pickle can allow it")
    elif cal_dict and cal_dict.get("scan"):
        # a calibrator records its training run's config; it never turns pickles on
        scan_config = {k: v for k, v in cal_dict["scan"].items() if k != "allow_pickle"}
    else:
        scan_config = DEFAULT_CONFIG

    scratch = os.path.abspath(scratch_dirpath)
    os.makedirs(scratch, exist_ok=True)
    progress = os.path.join(scratch, PROGRESS_FILE)
    if os.path.exists(progress):
        os.remove(progress)
    kill_at = deadline - margin(time_budget)  # monotonic time at which the worker is stopped
    job = {"model_filepath": os.path.abspath(model_filepath),
           "examples_dirpath": os.path.abspath(examples_dirpath), "scratch": scratch,
           "format": fmt, "allow_pickle": bool(allow_pickle), "round": round, "device": device,
           "config": scan_config, "kill_epoch": time.time() + (kill_at - time.monotonic()),
           "time_budget": float(time_budget), "progress": progress}
    job_path = os.path.join(scratch, JOB_FILE)
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, TMPDIR=scratch, TMP=scratch, TEMP=scratch,
               XDG_CACHE_HOME=os.path.join(scratch, "cache"),
               MPLCONFIGDIR=os.path.join(scratch, "mpl"),
               TORCH_HOME=os.path.join(scratch, "torch"))
    proc = subprocess.Popen([sys.executable, "-m", "xray.trojai_detect", "--worker", job_path],
                            env=env, stdout=sys.stderr.fileno() if _has_fileno() else None,
                            start_new_session=True, cwd=scratch)
    # The combiner (xray.reduce.calibrate pulls in scipy, scikit-learn, pandas) is imported in a
    # thread while the worker runs, so that a slow import never delays the deadline.
    importer = threading.Thread(target=_import_combiner, daemon=True)
    importer.start()
    timed_out = False
    try:
        proc.wait(timeout=max(0.0, kill_at - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    except BaseException:
        _stop(proc)
        raise
    results, errors, k, records, plan = _read_progress(progress)

    def finish(outcome: Outcome) -> Outcome:
        _write_record(scratch, list(plan["detectors"]), records, outcome, timed_out)
        return outcome

    why = "; ".join(errors[:3])
    if timed_out:
        why = (f"time budget of {time_budget:g} s ran out after {len(results)} detector(s)"
               + (f" ({why})" if why else ""))
    elif proc.returncode != 0 and not errors:
        why = f"the worker process exited with status {proc.returncode}"
    if not results:
        return finish(fallback(why or "no detector produced a result", results))
    importer.join(timeout=max(0.0, deadline - time.monotonic()))
    if importer.is_alive():
        return finish(fallback("time budget ran out while loading the combiner", results))
    # scipy / scikit-learn / pandas: imported only now, and already by the thread above
    from xray.reduce.calibrate import Calibrator, TrainingModelError, default_combined

    cal, in_training = None, None
    if cal_dict is not None:
        try:
            cal = Calibrator.from_dict(cal_dict, calibrator)
        except (ValueError, KeyError, TypeError) as e:
            return finish(fallback(f"calibrator {calibrator}: {e}", results))
    if cal is not None:
        # The same rule as `xray score-testset`: a model the calibrator was fitted on gets an
        # in-sample probability, so it is refused unless the user asks for it.
        pair = (str(plan.get("model_id")), str(plan.get("model_digest")))
        in_training = cal.trained_on(*pair)
        if in_training and not allow_training_models:
            try:
                cal.refuse_training_models([pair], hint="pass --allow-training-models to "
                                           "score it anyway (the record marks it in_training)")
            except TrainingModelError as e:
                outcome = fallback(str(e), results)
                outcome.in_training = True
                return finish(outcome)
        p, how = cal.predict_results(results, k), f"calibrator {cal.id}"
        how += "; in-sample: the calibrator was trained on this model" if in_training else ""
    else:
        p, best = default_combined(results, k)
        how = f"default map of {best}"
    p = float(min(1.0, max(0.0, p))) if math.isfinite(p) else FALLBACK
    _write_result(result_filepath, p)
    reason = how + (f"; partial: {why}" if why else "")
    return finish(Outcome(p, True, reason, results, time.monotonic() - started, in_training))


def _import_combiner() -> None:
    try:
        importlib.import_module("xray.reduce.calibrate")
    except Exception:  # reported when the names are imported for use
        pass


def _has_fileno() -> bool:
    try:
        sys.stderr.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# The worker process: loads the model and runs the detectors.


def _record(job: dict[str, Any]):
    """The ModelRecord of the job's model (no ground truth)."""
    # Worker-only imports (here and in `worker`): the driver never imports torch or numpy
    from PIL import Image

    from xray.io import trojai
    from xray.io.examples import list_examples

    model_dir = os.path.dirname(job["model_filepath"])
    facts: dict[str, Any] = {}
    config_path = os.path.join(model_dir, trojai.CONFIG_FILE)
    if job["round"] is None and os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)  # plain JSON: a jsonpickle file is never decoded
            if trojai.config_dialect(config) != "zoo":
                facts = trojai.row_from_config(config, os.path.basename(model_dir), set())
        except (OSError, ValueError):
            facts = {}
    examples = list_examples(job["examples_dirpath"])
    first = os.path.join(job["examples_dirpath"], examples[0][2])
    with Image.open(first) as image:
        size, channels = image.size, (1 if image.mode in ("L", "I", "I;16", "1") else 3)
    if facts:
        shape, preprocessing = tuple(facts["input_shape"]), facts["preprocessing"]
        mean, std = facts.get("mean") or (0.0,), facts.get("std") or (1.0,)
    else:
        mean, std = (0.0,), (1.0,)
        rnd = job["round"] or ("r1" if size == (224, 224) else "r2" if size == (256, 256) else None)
        if rnd is not None:
            shape, preprocessing = trojai.INPUT_SHAPE, trojai.PREPROCESSING[rnd]
        else:
            shape = (channels, size[1], size[0])
            preprocessing = {"channel_order": "RGB", "center_crop": None, "scale": "unit"}
    return ModelRecord(model_id=os.path.basename(model_dir) or "model", uri=job["model_filepath"],
                       format=job["format"],
                       architecture=str(facts.get("architecture") or "unknown"),
                       num_classes=int(facts.get("num_classes") or 1), input_shape=tuple(shape),
                       mean=tuple(mean), std=tuple(std), examples_uri=job["examples_dirpath"],
                       preprocessing=dict(preprocessing))


def _emit(path: str, event: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(event)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def worker(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    tempfile.tempdir = job["scratch"]
    progress = job["progress"]
    try:
        import torch  # worker-only, as in `_record`

        from xray.config import parse_config
        from xray.detectors.base import ScanContext, ScanData
        from xray.io.examples import load_examples
        from xray.io.model_loading import load_model, model_digest
        from xray.scanning import resolve_device, status_of_error, stop_margin

        config = parse_config(job["config"], source="trojai-detect config")
        device = resolve_device(job["device"] or config.device)
        record = _record(job)
        model = load_model(record, allow_pickle=job["allow_pickle"], device=str(device))
        x, y = load_examples(record, max_per_class=config.examples_per_class)
        with torch.no_grad():
            k = int(model(x[:1].to(device)).shape[-1])
        record = dataclasses.replace(record, num_classes=k)
        detectors = [spec.build() for spec in config.detectors]
    except Exception as err:  # reported through the progress file; the driver writes 0.5
        _emit(progress, {"event": "error", "message": f"{type(err).__name__}: {err}"})
        print(f"trojai-detect worker: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    data = ScanData(x=x.to(device), y=y.to(device), num_classes=k, mean=tuple(record.mean),
                    std=tuple(record.std))
    _emit(progress, {"event": "plan", "detectors": [d.name for d in detectors],
                     "model_id": record.model_id, "model_digest": model_digest(record.uri)})
    stop_early_by = stop_margin(job["time_budget"])
    for detector in detectors:
        ctx = ScanContext(device=device, seed=config.seed,
                          logger=logging.getLogger(f"xray.detector.{detector.name}"),
                          deadline=job["kill_epoch"] - time.time() - stop_early_by)
        started = time.perf_counter()
        try:
            result = detector.score(model, data, ctx)
        except Exception as err:
            _emit(progress, {"event": "detector_error", "detector": detector.name,
                             "status": status_of_error(err),
                             "seconds": time.perf_counter() - started,
                             "message": f"{detector.name}: {type(err).__name__}: {err}"})
            continue
        _emit(progress, {"event": "result", "detector": detector.name, "score": result.score,
                         "target": result.target, "stats": result.stats, "num_classes": k,
                         "seconds": time.perf_counter() - started})
    return 0


# ---------------------------------------------------------------------------------------------
# Command line: `trojai-detector` and `xray trojai-detect` (the same click command). The four
# TrojAI arguments keep the harness's spelling (--model_filepath ...) and also take dashes.


@click.command("trojai-detect", context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.option("--model_filepath", "--model-filepath", "model_filepath", required=True,
              metavar="M", help="The model file to judge (TrojAI: a whole-module model.pt).")
@click.option("--result_filepath", "--result-filepath", "result_filepath", required=True,
              metavar="R", help="Where to write P(trojaned), one float on the first line.")
@click.option("--scratch_dirpath", "--scratch-dirpath", "scratch_dirpath", required=True,
              metavar="S", help="The only folder used for temporary files; S/xray-detect.json "
              "says what ran.")
@click.option("--examples_dirpath", "--examples-dirpath", "examples_dirpath", required=True,
              metavar="E", help="Folder of clean example images (class_<c>_example_<i>.png).")
@cli_args.config("the calibrator's training config, else Model X-ray's small preset")
@cli_args.CALIBRATOR
@click.option("--time-budget", "--time_budget", "time_budget", type=float,
              default=DEFAULT_BUDGET, show_default=True, metavar="SECONDS",
              help="Seconds for this model, counted from the start of the process (from the "
              "command's start in a long-lived process); R is written before it ends.")
@cli_args.allow_pickle("--allow_pickle")
@cli_args.ALLOW_TRAINING_MODELS
@click.option("--round", "round_", type=click.Choice(ROUNDS), default=None,
              help="Force a round's example preprocessing (default: inferred).")
@click.option("--format", "model_format", type=click.Choice(MODEL_FORMATS), default=None,
              help="Model file format (default: from the file name: .safetensors, "
              ".torchscript.pt / .ts; anything else is a whole-module pickle).")
@cli_args.device("auto", "torch device of the worker: auto (cuda when present), cpu, cuda "
                 "or cuda:N.")
@click.pass_context
def main(ctx: click.Context, model_filepath: str, result_filepath: str, scratch_dirpath: str,
         examples_dirpath: str, config_uri: str | None, calibrator: str | None,
         time_budget: float, allow_pickle: bool, allow_training_models: bool,
         round_: str | None, model_format: str | None, device: str) -> None:
    """The TrojAI (rounds 1-4) detector entrypoint: writes P(trojaned) on the first line of
    the result file R, always (0.5 with the reason on stderr when it cannot do better). Exit 0
    when R holds an estimate, 1 when it holds the 0.5 fallback, 2 on a usage error. Installed as
    `trojai-detector`; also `xray trojai-detect` and `python -m xray.trojai_detect`."""
    now = time.monotonic()
    started = STARTED if now - STARTED < FRESH_PROCESS_S else now
    try:
        outcome = detect(model_filepath, result_filepath, scratch_dirpath, examples_dirpath,
                         config=config_uri, calibrator=calibrator, time_budget=time_budget,
                         allow_pickle=allow_pickle, round=round_, model_format=model_format,
                         device=device, allow_training_models=allow_training_models,
                         started=started)
    except BaseException as err:  # last resort: R already holds 0.5
        print(f"trojai-detect: wrote {FALLBACK} (unexpected {type(err).__name__}: {err})",
              file=sys.stderr)
        ctx.exit(130 if isinstance(err, KeyboardInterrupt) else 1)
    verb = "wrote" if outcome.estimated else "wrote the fallback"
    print(f"trojai-detect: {verb} {outcome.probability:.6g} in {outcome.seconds:.1f} s "
          f"({outcome.reason})", file=sys.stderr)
    ctx.exit(outcome.exit_code)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # the process `detect` spawns
        sys.exit(worker(sys.argv[2]))
    main(prog_name="trojai-detector")
