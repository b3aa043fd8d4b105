"""The `xray` command line: thin wrappers, one library call per command (mlflow style).

Known errors (bad input, a missing file) print one clear line and exit 1; a usage error exits 2.
Options that several commands take are defined once, in xray/cli_args.py. `xray trojai-detect`
is the command of xray/trojai_detect.py (also the `trojai-detector` console script).

The imports inside command bodies pull in torch, Ray, pandas, scikit-learn or matplotlib: they
stay there so that `xray --help` and a command's `--help` start in a fraction of a second.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from xray import cli_args, nightly as nightly_job, trojai_detect
from xray.io import storage
from xray.results.lease import LeaseHeld, LeaseLost
from xray.zoo.recipe import load_recipe


class UserError(click.ClickException):
    exit_code = 1


def _fail_cleanly(fn):
    """Turn expected errors into one line on stderr and exit 1 (no traceback). A bad manifest
    (xray.io.manifest.ManifestError), config or calibrator raises a ValueError; an output folder
    another driver writes to, LeaseHeld; a path of the wrong kind (--out naming a file) or not
    writable, an OSError naming it; storage that keeps failing, a transient error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, ValueError, KeyError, LeaseHeld, LeaseLost) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise UserError(str(message)) from err
        except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
            # a path the user gave is of the wrong kind or not theirs (--out naming a file)
            hint = (" (a file where a folder is needed)"
                    if isinstance(err, (FileExistsError, NotADirectoryError)) else "")
            raise UserError(f"{err.filename}: {err.strerror}{hint}") from err
        except Exception as err:
            if not storage.is_transient(err):
                raise
            # storage still failing after its retries: rows written so far stay; the same
            # command run again plans only what is missing
            text = (str(err).strip().splitlines() or [""])[0]
            raise UserError(f"storage unavailable after retries ({type(err).__name__}: "
                            f"{text}); run the same command again to finish") from err

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="xray")
def main(verbose: int) -> None:
    """xray: scan corpora of trained image classifiers for backdoors.

    Typical use: build a round of real clean and trojaned models with `xray zoo build`, scan it
    with `xray scan`, read the summary with `xray report`, look at one model with `xray explain`.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends a command as Ctrl-C does: every `finally` runs (rows still buffered are
    written, the output lease is released, the scan actors are killed) and then the exit
    handlers (the local Ray instance this command started is shut down, its agents too).
    Exit status 143 (128 + SIGTERM), or 1 when it lands inside a Ray call (Ray raises its own
    SystemExit(1) there)."""
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- zoo
@main.group()
def zoo() -> None:
    """Train clean and backdoored models offline and write them as a round."""


@zoo.command("build")
@cli_args.recipe(True, "its models are written to --out")
@click.option("--out", required=True, metavar="URI",
              help="Round directory to write (local path, file://, s3://, memory://).")
@cli_args.WORKERS
@cli_args.device("cpu", "Where models train: cpu, cuda, cuda:N, or auto (cuda when "
                 "available). Bit-for-bit reproducible on cpu only.")
@click.option("--stacking", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Train a recipe's `stack: K` groups K models at a time: auto = only on a "
                   "GPU (on CPUs one-by-one training is faster).")
@cli_args.QUIET
@_fail_cleanly
def zoo_build(recipe: str, out: str, workers: int | None, device: str, stacking: str,
              quiet: bool) -> None:
    """Train the models of a recipe and write them as a TrojAI-style round.

    Models already written in OUT are skipped, so an interrupted build resumes where it stopped.
    While a build runs, OUT/_lease.json names it and a second build into OUT refuses.
    """
    from xray.zoo.build import build_round

    result = build_round(load_recipe(recipe), out, workers=workers, show_progress=not quiet,
                         device=device, stacking=stacking)
    click.echo(f"round {out}: {len(result.records)} models ({result.trained} trained now, "
               f"{result.skipped} already there, {len(result.failed)} failed)")
    for failure in result.failed:
        click.echo(f"  failed {failure['model_id']}: {failure['reason']}")
    click.echo(f"manifest: {storage.join(out, 'manifest.csv')}")


@zoo.command("describe")
@click.argument("round_uri", metavar="URI")
@_fail_cleanly
def zoo_describe(round_uri: str) -> None:
    """Counts by attack and architecture, clean accuracy and ASR of a round."""
    from xray.zoo.describe import describe_round

    click.echo(describe_round(round_uri))


# ---------------------------------------------------------------- mntd
@main.group()
def mntd() -> None:
    """MNTD's meta-classifier: train it on a shadow round (recipe mntd_shadow)."""


@mntd.command("train")
@click.option("--shadow", required=True, metavar="URI",
              help="Shadow round directory (built with `xray zoo build --recipe mntd_shadow`).")
@click.option("--out", default=None, metavar="URI",
              help="Artifact directory to write (default: <shadow>/mntd_meta).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Query-tuning epochs (each a pass over the training shadow models).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fresh meta-classifiers to train; the best validation AUC is kept.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the queries, the classifier and the epoch permutations.")
@click.option("--no-query-tuning", is_flag=True, help="Train the classifier only (--no_qt).")
@cli_args.device("cpu", "torch device for training: cpu, cuda or cuda:N.")
@click.option("--select", type=click.Choice(["auc_loss", "auc", "last"]), default="auc_loss",
              show_default=True, help="Epoch kept: best validation AUC, ties broken by lower "
              "validation loss (auc_loss); the first best AUC (auc: the reference); the last.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads while training (default: torch's; 1 is fastest for small CNNs).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Stop training after this long with the best epoch so far (recorded in the "
              "artifact as stopped_early).")
@cli_args.QUIET
@_fail_cleanly
def mntd_train(shadow: str, out: str | None, epochs: int, repeats: int, seed: int,
               no_query_tuning: bool, device: str, select: str, threads: int | None,
               time_limit: float | None, quiet: bool) -> None:
    """Train MNTD's meta-classifier on a shadow round and write the artifact the `mntd` detector
    loads (detector parameter `artifact`)."""
    from xray.detectors.mntd import train_meta_classifier

    result = train_meta_classifier(shadow, out, epochs=epochs, repeats=repeats, seed=seed,
                                   query_tuning=not no_query_tuning, device=device,
                                   select=select, threads=threads, show_progress=not quiet,
                                   time_limit_s=time_limit)
    click.echo(f"meta-classifier {result.artifact_uri}: {result.n_train} training / "
               f"{result.n_val} validation shadow models, best epoch {result.best_epoch + 1}, "
               f"validation AUC {result.best_val_auc:.3f}"
               + (" (stopped early by --time-limit)"
                  if result.info["training"]["stopped_early"] else ""))


# ---------------------------------------------------------------- scan
@main.command()
@cli_args.manifest(True, "every model of it is scanned")
@cli_args.OUT
@cli_args.detectors("those in --config, else modelxray")
@cli_args.config("modelxray")
@cli_args.PRESET
@cli_args.ADDRESS
@cli_args.ACTORS
@click.option("--cpus-per-actor", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="CPUs each actor requests (also its torch thread count).")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs each actor requests (fractions allowed).")
@cli_args.STACK
@cli_args.ALLOW_PICKLE
@click.option("--retry-errors", is_flag=True, help="Scan again models whose last row is an error.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Per-model time limit; a model past it gets a `timeout` row (default: none).")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Times a model is retried on another actor when its worker process dies, "
                   "before it is recorded as `crashed`.")
@click.option("--flush-seconds", type=click.FloatRange(min=0), default=10.0,
              show_default=True,
              help="Rows are written to Parquet at least this often (what an interrupted "
                   "driver can lose; re-running the command scans it again).")
@click.option("--root", default=None, metavar="URI",
              help="Confine the manifest: refuse it when a model or examples URI lies outside "
                   "this folder (for manifests you did not write).")
@cli_args.QUIET
@_fail_cleanly
def scan(manifest: str, out: str, detectors: list[str] | None, config_uri: str | None,
         preset: str | None, address: str | None, actors: int | None, cpus_per_actor: float,
         gpus_per_actor: float, stack_size: int, allow_pickle: bool, retry_errors: bool,
         time_limit: float | None,
         max_retries: int, flush_seconds: float, root: str | None, quiet: bool) -> None:
    """Scan every model of a manifest and stream per-model scores to OUT/scores (Parquet).

    Models already scored with the same config are skipped; re-running finishes an interrupted
    scan. Ends with the summary table.

    A --config with `stages` scans as a cascade: stage 1's detectors on every model, each later
    stage's only on the models its calibrator leaves uncertain; the detector "cascade" holds
    each model's final probability and the stage that decided it (docs/CASCADE.md).
    """
    from xray.config import load_config, with_preset
    from xray.reduce.summary import format_table, refresh_summary
    from xray.runner import run_scan

    config = load_config(config_uri, detectors, allow_pickle=allow_pickle,
                         model_time_limit_s=time_limit)
    if preset:
        config = with_preset(config, preset)
    options = dict(address=address, num_actors=actors, num_cpus_per_actor=cpus_per_actor,
                   num_gpus_per_actor=gpus_per_actor, retry_errors=retry_errors,
                   max_retries=max_retries, flush_seconds=flush_seconds, stack_size=stack_size,
                   show_progress=not quiet, root=root)
    if config.stages:
        from xray.pipeline import run_cascade

        cascade = run_cascade(manifest, out, config, **options)
        for stage in cascade.stages:
            click.echo(f"stage {stage.number} ({', '.join(stage.detectors)}): "
                       + _run_line(stage.run) + f"; {stage.detector_seconds:.1f} detector-"
                       f"seconds; {stage.went_on} went on")
            _echo_errors(stage.run, out)
        decided = collections.Counter(cascade.decided_at.values())
        click.echo(f"cascade: {len(cascade.decided_at)} models decided ("
                   + ", ".join(f"{decided[s.number]} at stage {s.number}"
                               for s in cascade.stages)
                   + f"), {cascade.detector_seconds:.1f} detector-seconds")
    else:
        summary = run_scan(manifest, out, config, **options)
        click.echo(f"run {_run_line(summary)}")
        _echo_errors(summary, out)
    click.echo(format_table(refresh_summary(out)))


def _run_line(summary: Any) -> str:
    return (f"{summary.run_id}: {summary.models_scanned} of {summary.models_total} models "
            f"scanned ({summary.models_total - summary.models_planned} already scored), "
            f"{summary.failures} with errors, "
            + (f"{summary.not_applicable} detector rows not applicable, "
               if summary.not_applicable else "")
            + f"{summary.seconds:.1f} s (idle tail {summary.idle_tail_seconds:.1f} s)")


def _echo_errors(summary: Any, out: str) -> None:
    """What failed, under the run line: the first failed rows' first error line each, and where
    the rest and the tracebacks are (an error row per model and detector is in the scores)."""
    from xray.reduce.formatting import first_line

    for model_id, detector, status, error in summary.first_errors:
        click.echo(f"  {model_id} {detector} ({status}): {first_line(error, 300) or '-'}", err=True)
    if summary.first_errors:
        more = summary.failed_rows - len(summary.first_errors)
        click.echo(f"  {f'{more} more failed rows; ' if more > 0 else ''}tracebacks: "
                   f"`xray report {out}` (errors section)", err=True)


@main.command()
@click.argument("out", metavar="OUT")
@click.option("--run", "run_id", default=None, help="Only this run (default: all runs in OUT).")
@click.option("--html", "html_path", default=None, metavar="FILE",
              help="Where to write the HTML report (default: OUT/report.html).")
@click.option("--max-drilldown", type=click.IntRange(min=0), default=20, show_default=True,
              help="Models with a drill-down section (flagged or misclassified ones, "
                   "misclassified first; 0 = none).")
@click.option("--model", "models", multiple=True, metavar="MODEL_ID",
              help="Drill into this model whatever its verdicts (repeatable).")
@click.option("--planes", type=click.IntRange(min=0), default=3, show_default=True,
              help="Model X-ray planes re-run and drawn per drill-down model (0 = none).")
@cli_args.THRESHOLDS
@cli_args.QUIET
@_fail_cleanly
def report(out: str, run_id: str | None, html_path: str | None, max_drilldown: int,
           models: tuple[str, ...], planes: int, thresholds: dict[str, float] | None,
           quiet: bool) -> None:
    """Summarise the scores in OUT (per detector x group) and write the HTML report.

    Under the summary table, one warning line when a threshold set on the clean models' scores
    (clean_q0.95) rests on fewer than 20 of them."""
    from xray.reduce.report import render_report
    from xray.reduce.summary import format_table, summarize, write_summary
    from xray.results.sink import read_table

    scores = read_table(out, "scores", run_id=run_id)
    if not len(scores):
        raise UserError(f"no scores under {out}" + (f" for run {run_id}" if run_id else ""))
    table = summarize(scores, thresholds)
    write_summary(out, table)
    click.echo(format_table(table))
    path = render_report(out, run_id=run_id, html_path=html_path, max_drilldown=max_drilldown,
                         drilldown_models=models, planes=planes, thresholds=thresholds,
                         show_progress=not quiet)
    click.echo(f"report: {path}")


@main.command()
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@cli_args.TOLERANCES
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]),
              default="text", show_default=True, help="Output format.")
@click.option("--output", default=None, metavar="FILE",
              help="Also write the comparison to FILE (any URI).")
@click.option("--all", "all_rows", is_flag=True,
              help="List every metric row (text and markdown), not only those that changed.")
@cli_args.THRESHOLDS
def compare(run_a: str, run_b: str, tolerances_uri: str | None, fmt: str,
            output: str | None, all_rows: bool, thresholds: dict[str, float] | None) -> None:
    """Compare scan RUN_B against the baseline RUN_A (output dirs, optionally OUT@RUN_ID).

    Per detector x group: deltas of ROC-AUC, CE, accuracy, TPR at the fixed FPR and runtime
    against tolerances; flipped verdicts with both scores (both judged at A's threshold); new
    errors / timeouts; models missing from one side; differing detector versions or configs.
    The text shows what changed (metric moves beyond their tolerance, flips, new / missing
    models) and counts the unchanged metric rows; --all lists every row. Exit 0 within
    tolerance, 1 on a regression, 2 on a usage error. A --threshold applies to both sides.
    """
    from xray.reduce.compare import CompareUsageError, compare as compare_runs, load_tolerances

    try:
        result = compare_runs(run_a, run_b, load_tolerances(tolerances_uri),
                              thresholds=thresholds)
        text = result.format(fmt, all_rows=all_rows)
    except CompareUsageError as err:
        raise click.UsageError(str(err)) from err
    click.echo(text, nl=False)
    if output:
        storage.write_text(output, text)
    sys.exit(result.exit_code)


@main.command()
@click.argument("out", metavar="OUT")
@click.argument("model_id")
@click.option("--png", default=None, metavar="FILE",
              help="Where to write the picture (default: OUT/explain/<model_id>-modelxray.png).")
@click.option("--planes", type=click.IntRange(min=1), default=4, show_default=True,
              help="Planes to draw.")
@_fail_cleanly
def explain(out: str, model_id: str, png: str | None, planes: int) -> None:
    """Draw a scanned model's decision-boundary planes (Model X-ray) as a PNG."""
    from xray.explain import explain_model

    path = explain_model(out, model_id, png_uri=png, max_planes=planes)
    click.echo(f"picture: {path}")
    from xray.explain import explain_triggers  # inverted triggers (nc / abs / karm), if scanned

    triggers_png = explain_triggers(out, model_id)
    if triggers_png:
        click.echo(f"triggers: {triggers_png}")


@main.command("detectors")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_detectors(as_json: bool) -> None:
    """Every registered detector with its version, parameters and their defaults."""
    from xray import detectors as registry

    described = []
    for name in registry.available():
        cls = registry.get(name)
        described.append({"name": name, "version": cls.version,
                          "params": {f.name: f.default for f in dataclasses.fields(cls.Params)},
                          "presets": sorted(getattr(cls, "presets", {}))})
    if as_json:
        click.echo(json.dumps(described, indent=2, default=str))
        return
    for d in described:
        click.echo(f"{d['name']} (version {d['version']}; presets: {', '.join(d['presets'])})")
        for key, value in d["params"].items():
            click.echo(f"    {key} = {value!r}")


@main.command("attacks")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_attacks(as_json: bool) -> None:
    """Every registered zoo attack with its parameters and defaults ("drawn": sampled from each
    model's seed), the trigger-to-target mappings it supports, and whether it is clean-label or
    trains the model itself. Recipes name them in `groups: [{attack: NAME, attack_params: ...}]`."""
    from xray.zoo import attacks

    described = [attacks.describe(name) for name in attacks.available()]
    if as_json:
        click.echo(json.dumps(described, indent=2, default=str))
        return
    for d in described:
        kind = ", ".join(k for k, on in (("clean-label", d["clean_label"]),
                                         ("trains the model", d["trains_model"])) if on)
        click.echo(f"{d['name']}: {d['summary']}")
        click.echo(f"    mappings: {', '.join(d['mappings'])}" + (f"; {kind}" if kind else ""))
        for key, value in d["params"].items():
            click.echo(f"    {key} = {value!r}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, metavar="DIR",
              help="Where the demo round and the scan results go.")
@cli_args.WORKERS
@cli_args.QUIET
@_fail_cleanly
def demo(out: str, workers: int | None, quiet: bool) -> None:
    """The main job on its embedded default: build the demo round (real training, a few minutes
    on 2 cores), scan it with Model X-ray on a local Ray instance, print the summary and the AUC
    per attack, and write the HTML report."""
    from xray.demo import run_demo

    run_demo(Path(out), workers=workers, echo=click.echo, show_progress=not quiet)


# ---------------------------------------------------------------- TrojAI (issue 11)
@main.command()
@click.argument("out", metavar="OUT")
@click.option("--train-run", "train_run", required=True, metavar="RUN",
              help="Run id in OUT whose labelled models train the stacker ('all' = every run).")
@cli_args.detectors("every detector with ok scores in the run is stacked")
@click.option("--C", "c_value", type=float, default=None,
              help="Inverse L2 strength (default: chosen by cross-validation).")
@click.option("--model", "model", default=None, metavar="NAME",
              help="Feature subset: 'prior', a detector's name, 'scores' or 'all' (default: "
                   "the one with the lowest cross-validated cross-entropy).")
@click.option("--artifact", default=None, metavar="FILE",
              help="Where to save the calibrator (default: OUT/calibration/RUN-ID.json).")
@_fail_cleanly
def calibrate(out: str, train_run: str, detectors: list[str] | None, c_value: float | None,
              model: str | None, artifact: str | None) -> None:
    """Fit the combined detector (regularised logistic regression over the detectors' scores
    and statistics, missing scores explicit; feature subset and C chosen by cross-validation)
    on a labelled run and save it as a versioned JSON artifact for `xray score-testset
    --calibrator` and `xray trojai-detect --calibrator`.

    The printed "cross-validated" CE / ROC-AUC is NESTED: the selection of subset and C is
    repeated inside each outer fold, so it estimates how the whole procedure does on models it
    has not seen (the per-candidate "selection CE" lines are optimistic). The artifact lists
    its training models (id, digest); `xray score-testset` refuses to score them unless
    --allow-training-models, and marks them when it does."""
    from xray.reduce.calibrate import calibrate as fit_calibrator
    from xray.reduce.calibrate import describe

    cal, uri = fit_calibrator(out, None if train_run == "all" else train_run,
                              artifact_uri=artifact, detectors=detectors, C=c_value, model=model)
    click.echo(describe(cal))
    click.echo(f"calibrator: {uri}")


# `xray trojai-detect`: the command (and its options) live with the entrypoint they run, which
# is also the `trojai-detector` console script and must start without this module's imports.
main.add_command(trojai_detect.main)


@main.command("score-testset")
@click.argument("round_dir", metavar="ROUND_DIR")
@cli_args.OUT
@click.option("--run", "run_id", default=None, help="Reuse this run's scores instead of scanning.")
@cli_args.config("the calibrator's training config, else modelxray")
@cli_args.CALIBRATOR
@cli_args.ALLOW_TRAINING_MODELS
@cli_args.STACK
@cli_args.ALLOW_PICKLE
@cli_args.ACTORS
@cli_args.ADDRESS
@cli_args.QUIET
@_fail_cleanly
def score_testset(round_dir: str, out: str, run_id: str | None, config_uri: str | None,
                  calibrator: str | None, allow_training_models: bool, stack_size: int,
                  allow_pickle: bool, actors: int | None, address: str | None,
                  quiet: bool) -> None:
    """Score a test set as the TrojAI harness does: CE (clipped) with its 95% interval, Brier,
    ROC-AUC (rounds 1-4 threshold form and roc_auc_score), missing = 0.5, per detector and for
    the combined detector. Writes OUT/testset/{per_model.csv,summary.csv,testset.html}.
    A test set holding models the calibrator was trained on (same id and digest) is refused (its
    figures would be in-sample) unless --allow-training-models: then they are marked (per model
    in_training, summary n_training_models) and a 'combined_held_out' row scores the others."""
    from xray.config import load_config
    from xray.pipeline import score_testset as run_score_testset
    from xray.reduce.calibrate import Calibrator
    from xray.reduce.harness import format_summary

    cal = Calibrator.load(calibrator) if calibrator else None
    if config_uri or cal is None:
        config = load_config(config_uri or None)
    else:
        config = cal.scan_config()
    config = dataclasses.replace(config, allow_pickle=allow_pickle)  # this command's flag only
    result = run_score_testset(round_dir, out, run_id=run_id, config=config, calibrator=cal,
                               scan_kwargs={"num_actors": actors, "address": address,
                                            "show_progress": not quiet,
                                            "stack_size": stack_size},
                               allow_training_models=allow_training_models)
    click.echo(format_summary(result.summary, result.warning))
    click.echo(f"per model: {result.per_model_uri}\nsummary: {result.summary_uri}\n"
               f"report: {result.html_uri}")


# ---------------------------------------------------------------- nightly regression
@main.command("nightly")
@click.option("--state", required=True, metavar="URI",
              help="Folder holding the zoo, scans, nights and the baseline pointer (any URI).")
@cli_args.recipe(False, "its round is built under --state when absent or changed")
@cli_args.manifest(False, "scanned as it is (a zoo that is not ours to build)")
@cli_args.config("modelxray")
@cli_args.PRESET
@cli_args.TOLERANCES
@click.option("--accept", is_flag=True,
              help="Make this night's scan the baseline once it is done.")
@click.option("--accept-night", default=None, metavar="ID",
              help="Only move the baseline to night ID ('latest' = the newest); no scan.")
@click.option("--rescan", type=click.Choice(["code", "config"]), default="code",
              show_default=True, help="What starts a fresh full scan: any change of xray's code "
              "or of the libraries a score depends on (code), or only detector versions / "
              "configs (config).")
@cli_args.ADDRESS
@cli_args.WORKERS
@click.option("--drilldown", type=int, default=None,
              help="Drill-down models in the report (default: the report's default).")
@cli_args.QUIET
@_fail_cleanly
def nightly_run(state: str, recipe: str | None, manifest: str | None, config_uri: str | None,
                preset: str | None, tolerances_uri: str | None, accept: bool,
                accept_night: str | None, rescan: str, address: str | None,
                workers: int | None, drilldown: int | None, quiet: bool) -> None:
    """The nightly regression over a model zoo: rebuild the zoo only when its recipe changed,
    scan it with the current code (models this code and config already scored are skipped),
    compare with the accepted baseline, and write report.html, comparison.{txt,md,json} and
    night.json under STATE/nights/<night id>/. The baseline moves only with --accept (this
    night) or --accept-night ID (a past night; nothing is scanned). Exit 0 clean or no baseline
    yet, 1 on a regression, 2 on a usage error. As a Ray job: jobs/nightly.py."""
    from xray.config import load_config, with_preset
    from xray.reduce.compare import CompareUsageError, load_tolerances

    if accept_night:
        pointer = nightly_job.accept_night(state, accept_night)
        click.echo(f"baseline: night {pointer['night_id']} ({pointer['scan_uri']})")
        return
    if recipe and manifest:
        raise click.UsageError("--recipe and --manifest are exclusive: give one")
    if not (recipe or manifest):
        raise click.UsageError("one of --recipe and --manifest is required (or --accept-night)")
    try:
        config = load_config(config_uri)
        if preset:
            config = with_preset(config, preset)
        tolerances = load_tolerances(tolerances_uri)
    except (CompareUsageError, ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from err
    report = {} if drilldown is None else {"max_drilldown": drilldown}
    night = nightly_job.run_nightly(state, recipe=recipe, manifest=manifest, config=config,
                                    tolerances=tolerances, accept=accept, rescan=rescan,
                                    address=address, workers=workers, report=report,
                                    show_progress=not quiet)
    click.echo(nightly_job.describe(night))
    sys.exit(night.exit_code)


if __name__ == "__main__":
    sys.exit(main())
