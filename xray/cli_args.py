"""Options that more than one command takes, defined once (mlflow's `cli_args.py` pattern).

    @click.command()
    @cli_args.config("modelxray")
    @cli_args.ALLOW_PICKLE
    def scan(config_uri, allow_pickle): ...

A constant (upper case) is an option every command spells, defaults and explains the same way;
a function (lower case) returns one whose default, or the words for it, is the command's own.
Only click is imported here: `trojai-detector` builds its command from these and must start
fast.
"""
from __future__ import annotations

from typing import Any, Callable

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _names(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    """A,B -> ["A", "B"]; nothing -> None."""
    names = [n.strip() for n in value.split(",") if n.strip()] if value else []
    return names or None


def _thresholds(_ctx: click.Context, _param: click.Parameter,
                value: tuple[str, ...]) -> dict[str, float] | None:
    """("nc=0.5", ...) -> {"nc": 0.5, ...}; nothing -> None."""
    given = {}
    for item in value:
        name, _, number = item.partition("=")
        try:
            given[name.strip()] = float(number)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected DETECTOR=NUMBER") from None
    return given or None


# ---------------------------------------------------------------- what to scan and how
def config(default: str) -> Decorator:
    """--config FILE -> config_uri; `default` says what is used without it."""
    return click.option("--config", "config_uri", default=None, metavar="FILE",
                        help="Scan config YAML: seed, detectors with preset / params, "
                             f"examples_per_class (default: {default}).")


def detectors(default: str) -> Decorator:
    """--detectors A,B -> a list of names, or None."""
    return click.option("--detectors", default=None, metavar="A,B", callback=_names,
                        help=f"Comma-separated detector names (see `xray detectors`); "
                             f"default: {default}.")


OUT = click.option("--out", required=True, metavar="URI",
                   help="Scan output folder: the result tables (scores, triggers, runs) go "
                        "under it; models already scored there with the same config are not "
                        "scanned again.")
PRESET = click.option("--preset", default=None, metavar="NAME",
                      help="Preset for every selected detector that has it (e.g. small, "
                           "reference).")


def allow_pickle(*aliases: str) -> Decorator:
    """--allow-pickle (and `aliases`, e.g. TrojAI's --allow_pickle) -> allow_pickle."""
    return click.option("--allow-pickle", *aliases, "allow_pickle", is_flag=True,
                        help="Allow whole-module pickled models (TrojAI's model.pt): they run "
                             "code when loaded, so they load only in worker processes. Off by "
                             "default.")


ALLOW_PICKLE = allow_pickle()


def device(default: str, help: str) -> Decorator:
    """--device DEVICE, with the command's default and its words for the devices it takes."""
    return click.option("--device", default=default, show_default=True, metavar="DEVICE",
                        help=help)


# ---------------------------------------------------------------- Ray
ADDRESS = click.option("--address", default=None, metavar="ADDR",
                       help="Ray cluster address (e.g. ray://head:10001 or auto); default: "
                            "RAY_ADDRESS (set inside `ray job submit`), else a local Ray "
                            "instance.")
ACTORS = click.option("--actors", type=click.IntRange(min=1), default=None,
                      help="Number of scan actors (default: fill the cluster's CPUs / GPUs).")
STACK = click.option("--stack", "stack_size", type=click.IntRange(min=1), default=1,
                     show_default=True,
                     help="Send up to this many models of one architecture to an actor "
                          "together; Model X-ray scores a stack in one vmapped pass (use 8-32 "
                          "on GPUs).")

# ---------------------------------------------------------------- zoo
def recipe(required: bool, built: str) -> Decorator:
    """--recipe FILE|NAME; `built` says where its round goes."""
    return click.option("--recipe", required=required, default=None, metavar="FILE|NAME",
                        help="Recipe YAML file, or the name of one in manifests/recipes/ (demo, "
                             f"reference, ...); {built}.")


def manifest(required: bool, how: str) -> Decorator:
    """--manifest URI; `how` says what is done with it."""
    return click.option("--manifest", required=required, default=None, metavar="URI",
                        help=f"Manifest (CSV, JSONL, Parquet, YAML) or a round directory; {how}.")


WORKERS = click.option("--workers", type=click.IntRange(min=1), default=None,
                       help="Training processes in parallel (default: one per CPU core).")

# ---------------------------------------------------------------- reading results
THRESHOLDS = click.option(
    "--threshold", "thresholds", multiple=True, metavar="DETECTOR=VALUE", callback=_thresholds,
    help="Threshold of a detector (score >= VALUE -> trojaned), instead of calibrating it on "
         "known-clean models; verdicts without ground truth need one (repeatable).")
TOLERANCES = click.option("--tolerances", "tolerances_uri", default=None, metavar="FILE",
                          help="YAML / JSON comparison tolerances, globally and per detector "
                               "(defaults: see xray/reduce/compare.py).")

# ---------------------------------------------------------------- the combined detector
CALIBRATOR = click.option("--calibrator", default=None, metavar="FILE",
                          help="Combined detector artifact, from `xray calibrate`.")
ALLOW_TRAINING_MODELS = click.option(
    "--allow-training-models", is_flag=True,
    help="Score models the calibrator was trained on (same id and file digest) instead of "
         "refusing them; their probability is in-sample, so they are marked in_training.")

QUIET = click.option("--quiet", is_flag=True, help="No progress bar.")
