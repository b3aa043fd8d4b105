"""Session fixture of the report / compare tests: the tiny round scanned once by the real runner.

Imported by conftest.py. Scanned with Model X-ray's `small` preset on a local Ray instance (the
same `ensure_ray` as the `ray_local` fixture, which is module-scoped and so cannot be used by a
session fixture).
"""
from __future__ import annotations

import pytest

SMALL = {"detectors": {"modelxray": {"preset": "small"}}}


@pytest.fixture(scope="session")
def scanned_tiny(tiny_round, tmp_path_factory):
    """(scan output dir, round dir, RunSummary): tiny_round scanned with modelxray small."""
    from xray.config import parse_config
    from xray.runner import run_scan
    from xray.runner.scan_run import ensure_ray

    round_dir, _ = tiny_round
    ensure_ray(None)
    out = tmp_path_factory.mktemp("scanned_tiny") / "out"
    summary = run_scan(str(round_dir / "manifest.csv"), str(out), parse_config(SMALL),
                       show_progress=False)
    assert summary.failures == 0, summary.status_counts
    return out, round_dir, summary
