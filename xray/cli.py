"""The `xray` command line: thin wrappers, one library call per command (mlflow style).

Known errors (bad input, a missing file) print one clear line and exit 1; a usage error exits 2.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from xray.io import storage


class UserError(click.ClickException):
    exit_code = 1


def _fail_cleanly(fn):
    """Turn expected errors into one line on stderr and exit 1 (no traceback)."""
    import functools

    from xray.io.manifest import ManifestError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ManifestError, FileNotFoundError, ValueError, KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise UserError(str(message)) from err

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


# ---------------------------------------------------------------- zoo
@main.group()
def zoo() -> None:
    """Train clean and backdoored models offline and write them as a round."""


@zoo.command("build")
@click.option("--recipe", required=True, metavar="FILE|NAME",
              help="Recipe YAML file, or the name of one in manifests/recipes/ (demo, reference).")
@click.option("--out", required=True, metavar="URI",
              help="Round directory to write (local path, file://, s3://, memory://).")
@click.option("--workers", type=int, default=None,
              help="Training processes in parallel (default: one per CPU core).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def zoo_build(recipe: str, out: str, workers: int | None, quiet: bool) -> None:
    """Train the models of a recipe and write them as a TrojAI-style round.

    Models already written in OUT are skipped, so an interrupted build resumes where it stopped.
    """
    from xray.zoo.build import build_round
    from xray.zoo.recipe import load_recipe

    result = build_round(load_recipe(recipe), out, workers=workers, show_progress=not quiet)
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


# ---------------------------------------------------------------- scan
@main.command()
@click.option("--manifest", required=True, metavar="URI",
              help="Manifest (CSV, JSONL, Parquet, YAML) or a round directory.")
@click.option("--out", required=True, metavar="URI", help="Output directory for the result tables.")
@click.option("--detectors", default=None, metavar="A,B",
              help="Comma-separated detector names (see `xray detectors`); default: those in "
                   "--config, else modelxray.")
@click.option("--config", "config_uri", default=None, metavar="FILE",
              help="Run config YAML: seed, detectors with preset / params, examples_per_class.")
@click.option("--preset", default=None,
              help="Preset for every selected detector that has it (e.g. small, reference).")
@click.option("--address", default=None,
              help="Ray cluster address (e.g. ray://head:10001 or auto); default: start a local "
                   "Ray instance.")
@click.option("--actors", type=int, default=None, help="Number of scan actors (default: fill "
              "the cluster's CPUs / GPUs).")
@click.option("--cpus-per-actor", type=float, default=1.0, show_default=True,
              help="CPUs each actor requests (also its torch thread count).")
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True,
              help="GPUs each actor requests (fractions allowed).")
@click.option("--allow-pickle", is_flag=True,
              help="Allow whole-module pickled models (they run code when loaded; only in "
                   "workers). Off by default.")
@click.option("--retry-errors", is_flag=True, help="Scan again models whose last row is an error.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def scan(manifest: str, out: str, detectors: str | None, config_uri: str | None,
         preset: str | None, address: str | None, actors: int | None, cpus_per_actor: float,
         gpus_per_actor: float, allow_pickle: bool, retry_errors: bool, quiet: bool) -> None:
    """Scan every model of a manifest and stream per-model scores to OUT/scores (Parquet).

    Models already scored with the same config are skipped; re-running finishes an interrupted
    scan. Ends with the summary table.
    """
    from xray.config import load_config, with_preset
    from xray.reduce.summary import format_table, summarize, write_summary
    from xray.results.sink import read_table
    from xray.runner import run_scan

    names = [n.strip() for n in detectors.split(",") if n.strip()] if detectors else None
    config = load_config(config_uri, names, allow_pickle=allow_pickle or None)
    if preset:
        config = with_preset(config, preset)
    summary = run_scan(manifest, out, config, address=address, num_actors=actors,
                       num_cpus_per_actor=cpus_per_actor, num_gpus_per_actor=gpus_per_actor,
                       retry_errors=retry_errors, show_progress=not quiet)
    click.echo(f"run {summary.run_id}: {summary.models_scanned} of {summary.models_total} models "
               f"scanned ({summary.models_total - summary.models_planned} already scored), "
               f"{summary.failures} with errors, {summary.seconds:.1f} s")
    table = summarize(read_table(out, "scores"))
    write_summary(out, table)
    click.echo(format_table(table))


@main.command()
@click.argument("out", metavar="OUT")
@click.option("--run", "run_id", default=None, help="Only this run (default: all runs in OUT).")
@click.option("--html", "html_path", default=None, metavar="FILE",
              help="Where to write the HTML report (default: OUT/report.html).")
@_fail_cleanly
def report(out: str, run_id: str | None, html_path: str | None) -> None:
    """Summarise the scores in OUT (per detector x group) and write the HTML report."""
    from xray.reduce.report import render_report
    from xray.reduce.summary import format_table, summarize, write_summary
    from xray.results.sink import read_table

    scores = read_table(out, "scores", run_id=run_id)
    if not len(scores):
        raise UserError(f"no scores under {out}" + (f" for run {run_id}" if run_id else ""))
    table = summarize(scores)
    write_summary(out, table)
    click.echo(format_table(table))
    click.echo(f"report: {render_report(out, run_id=run_id, html_path=html_path)}")


@main.command()
@click.argument("out", metavar="OUT")
@click.argument("model_id")
@click.option("--png", default=None, metavar="FILE",
              help="Where to write the picture (default: OUT/explain/<model_id>-modelxray.png).")
@click.option("--planes", type=int, default=4, show_default=True, help="Planes to draw.")
@_fail_cleanly
def explain(out: str, model_id: str, png: str | None, planes: int) -> None:
    """Draw a scanned model's decision-boundary planes (Model X-ray) as a PNG."""
    from xray.explain import explain_model

    path = explain_model(out, model_id, png_uri=png, max_planes=planes)
    click.echo(f"picture: {path}")


@main.command("detectors")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_detectors(as_json: bool) -> None:
    """Every registered detector with its version, parameters and their defaults."""
    import dataclasses

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


@main.command()
@click.option("--out", default="demo-out", show_default=True, metavar="DIR",
              help="Where the demo round and the scan results go.")
@click.option("--workers", type=int, default=None, help="Training processes (default: cores).")
@_fail_cleanly
def demo(out: str, workers: int | None) -> None:
    """The main job on its embedded default: build the demo round (real training, a few minutes
    on 2 cores), scan it with Model X-ray on a local Ray instance, print the summary and the AUC
    per attack, and write the HTML report."""
    from xray.demo import run_demo

    run_demo(Path(out), workers=workers, echo=click.echo)


if __name__ == "__main__":
    sys.exit(main())
