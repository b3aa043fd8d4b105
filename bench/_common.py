"""What every benchmark records: {command, date, machine, figures} in bench/results/NAME.json."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "platform": platform.platform()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings on an accelerator are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record(name: str, command: str, figures: dict[str, float], notes: dict | None = None, *,
           merge: bool = False) -> Path:
    """Write bench/results/NAME.json. merge=True keeps the figures and notes already in the file
    and updates only the given ones (command, date and machine are this run's)."""
    from xray.jsonsafe import json_safe

    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if merge and out.exists() else {}
    # a figure is a number: one that could not be measured (NaN, inf) is left out, and said
    undefined = sorted(k for k, v in figures.items() if not math.isfinite(float(v)))
    if undefined:
        print(f"{name}: not recorded, no finite value: {', '.join(undefined)}", file=sys.stderr)
    payload = {"command": command, "date": dt.date.today().isoformat(), "machine": machine(),
               "figures": {**old.get("figures", {}), **{k: float(v) for k, v in figures.items()
                                                       if k not in undefined}}}
    notes = {**old.get("notes", {}), **(notes or {})}
    if notes:
        payload["notes"] = json_safe(notes)  # JSON has no NaN: null
    out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return out


DEMO_ROUND = Path("/tmp/demo1/round")
DEMO_FALLBACK = Path("/tmp/demo-bench/round")
EXRAY_ROUND = Path("/tmp/xray-bench-exray-round")


def demo_round() -> Path:
    """The demo round: /tmp/demo1/round if it exists, else built once into /tmp/demo-bench."""
    if (DEMO_ROUND / "METADATA.csv").exists():
        return DEMO_ROUND
    if not (DEMO_FALLBACK / "METADATA.csv").exists():
        subprocess.run([sys.executable, "-m", "xray.cli", "zoo", "build", "--recipe", "demo",
                        "--out", str(DEMO_FALLBACK), "--quiet"], check=True)
    return DEMO_FALLBACK


def exray_round(round_dir: Path = EXRAY_ROUND) -> Path:
    """The EX-RAY bench round (recipe `exray`: 10 NiN models), built once into round_dir."""
    if not any(round_dir.glob("id-*/config.json")):
        from xray.zoo.build import build_round
        from xray.zoo.recipe import load_recipe

        print(f"building the exray round into {round_dir} ...", flush=True)
        build_round(load_recipe("exray"), str(round_dir), show_progress=True)
    return round_dir


def xray_cli(*args: str) -> str:
    """`python -m xray.cli ARGS` (the command line a user runs); its stdout. A failure ends the
    bench with the command and the ends of its stdout and stderr, not only its exit status
    (`xray scan` lists its failed rows on stdout; stderr may hold only Ray's warnings)."""
    done = subprocess.run([sys.executable, "-m", "xray.cli", *args], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"xray {' '.join(args)} failed (exit {done.returncode}):\n"
                         f"stdout: ...{done.stdout[-2000:]}\nstderr: ...{done.stderr[-2000:]}")
    return done.stdout


def build_and_scan(recipe: str, folder: Path, detectors: list[str], actors: int) -> Path:
    """The zoo round of `recipe` (a name or a file) built into folder/round and scanned with
    `detectors` at their small presets into folder/out, through the command line; both resume
    (`xray zoo build` keeps built models, `xray scan` reuses scored rows). Returns folder/out."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    round_dir, out, config = folder / "round", folder / "out", folder / "scan.yaml"
    print(f"zoo build {recipe} -> {round_dir}", flush=True)
    xray_cli("zoo", "build", "--recipe", recipe, "--out", str(round_dir), "--quiet")
    config.write_text(yaml.safe_dump({"seed": 0, "detectors": {d: {"preset": "small"}
                                                               for d in detectors}}))
    print(f"scan with {', '.join(detectors)} -> {out}", flush=True)
    print(xray_cli("scan", "--manifest", str(round_dir), "--out", str(out), "--config",
                   str(config), "--actors", str(actors), "--quiet").splitlines()[0], flush=True)
    return out
