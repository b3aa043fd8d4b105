"""What every benchmark records: {command, date, machine, figures} in bench/results/NAME.json."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
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


def record(name: str, command: str, figures: dict[str, float], notes: dict | None = None) -> Path:
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "date": dt.date.today().isoformat(), "machine": machine(),
               "figures": {k: float(v) for k, v in figures.items()}}
    if notes:
        payload["notes"] = notes
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
