"""`make demo` / `xray demo`: the main job on its embedded default.

Builds the demo round (manifests/recipes/demo.yaml: real training of clean and trojaned models on
synthetic traffic signs), scans it with Model X-ray and MM-BD on a local Ray instance with the
demo config (manifests/configs/demo.yaml), prints the summary and the ROC-AUC per attack, writes
the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from xray.config import load_config
from xray.reduce.report import render_report
from xray.reduce.summary import format_table, refresh_summary
from xray.runner import run_scan
from xray.zoo.build import build_round
from xray.zoo.describe import describe_round
from xray.zoo.recipe import RECIPES_DIR, load_recipe

DEMO_CONFIG = RECIPES_DIR.parent / "configs" / "demo.yaml"


def run_demo(out: Path, workers: int | None = None, echo: Callable[[str], None] = print,
             show_progress: bool = True) -> dict:
    round_uri, scan_uri = str(out / "round"), str(out / "scan")
    echo(f"[1/3] building the demo round in {round_uri} (real training; resumes if interrupted)")
    built = build_round(load_recipe("demo"), round_uri, workers=workers,
                        show_progress=show_progress)
    echo(describe_round(round_uri))
    echo(f"[2/3] scanning {len(built.records)} models on a local Ray instance -> {scan_uri}")
    summary = run_scan(str(Path(round_uri) / "manifest.csv"), scan_uri,
                       load_config(str(DEMO_CONFIG)), show_progress=show_progress)
    echo(f"run {summary.run_id}: {summary.models_scanned} scanned, {summary.failures} with errors, "
         f"{summary.seconds:.1f} s")
    echo("[3/3] summary")
    table = refresh_summary(scan_uri)
    echo(format_table(table))
    per_attack = table[table["group_by"] == "attack"]
    for _, row in per_attack.iterrows():
        echo(f"ROC-AUC {row['detector']} on {row['group']}: {row['roc_auc']:.3f} "
             f"(n={int(row['n'])})")
    report = render_report(scan_uri)
    echo(f"report: {report}")
    return {"round": round_uri, "scan": scan_uri, "report": report, "summary": table}
