"""`xray zoo describe`: what a round holds, from its model configs."""
from __future__ import annotations

import pandas as pd

from xray.io import storage
from xray.zoo.round import failed_model_ids, model_configs


def _mapping(config: dict) -> str:
    """The config's trigger-to-target mapping (rounds built before mappings were recorded: from
    their victims)."""
    if not config.get("attack"):
        return "-"
    return config.get("mapping") or ("label-specific" if config.get("victims") else "all-to-one")


def round_table(round_uri: str) -> pd.DataFrame:
    rows = [{"model_id": config["model_id"], "architecture": config["architecture"],
             "attack": config.get("attack") or "clean", "mapping": _mapping(config),
             "clean_accuracy": config.get("clean_accuracy"), "asr": config.get("asr")}
            for config in model_configs(round_uri)]
    return pd.DataFrame(rows, columns=["model_id", "architecture", "attack", "mapping",
                                       "clean_accuracy", "asr"])


def describe_round(round_uri: str) -> str:
    """The round's counts per attack, mapping and architecture with clean accuracy and ASR; a
    FileNotFoundError when there is no folder at `round_uri` (a typo is not an empty round)."""
    if not storage.exists(round_uri):
        raise FileNotFoundError(f"{round_uri}: no such round folder")
    table = round_table(round_uri)
    failed = failed_model_ids(round_uri)
    if table.empty:
        return f"{round_uri}: no complete model directories ({len(failed)} failed)"
    grouped = (table.groupby(["attack", "mapping", "architecture"])
               .agg(models=("model_id", "count"), clean_acc_mean=("clean_accuracy", "mean"),
                    clean_acc_min=("clean_accuracy", "min"), asr_mean=("asr", "mean"),
                    asr_min=("asr", "min"))
               .reset_index())
    lines = [f"{round_uri}: {len(table)} models, {int((table.attack != 'clean').sum())} trojaned, "
             f"{len(failed)} failed (ASR below the floor)",
             grouped.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    return "\n".join(lines)
