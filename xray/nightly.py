"""The nightly regression over a model zoo: rebuild if the recipe changed, scan, compare, report.

    night = run_nightly("s3://bucket/xray-nightly", recipe="demo", config=config)
    night.exit_code        # 0 = clean (or no baseline yet), 1 = regression

One night:
  1. The zoo. With a recipe: the round lives at <state>/zoo/<name>-<recipe digest>/
     (`xray.zoo.recipe.Recipe.digest`, also stored in the round's round.json). It is built only
     when that round is absent or incomplete; an unchanged recipe rebuilds nothing, a changed one
     builds a new round beside the old one. With a manifest instead (a zoo that is not ours to
     build), the manifest is scanned as it is.
  2. The scan, with the current code: into <state>/scans/<zoo key>-<config hash>-<code key>/ via
     `xray.runner.run_scan`, whose plan skips every model already scored there. The code key
     (`xray.code_identity.code_key`) hashes xray's own source files and the versions of the
     libraries a score depends on, so a night after a code or dependency change scans everything
     again in a fresh folder, and a night after nothing changed scans nothing. rescan="config"
     drops the code key from the folder name: then only detector versions and parameters (the
     scores' keys) decide.
  3. The comparison: `xray.reduce.compare.compare(baseline scan, this scan)` against the
     tolerances, written beside this night's report as comparison.{txt,md,json}.
  4. The report: `xray.reduce.report.render_report` of this scan, at
     <state>/nights/<night id>/report.html, with night.json saying what happened.
  5. The baseline pointer <state>/baseline.json moves only on an explicit accept (`accept=True`
     for this night, or `accept_night` for a past one). With no baseline yet a night compares
     with nothing and exits 0; accept it to start.

<state>/latest.json is the newest night.json. Any fsspec URI works for <state>.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from xray.code_identity import code_key, code_version
from xray.io import storage
from xray.zoo.recipe import Recipe, load_recipe

# The imports inside functions pull in torch (zoo, config, manifests), Ray (runner) or pandas
# (compare, report): `import xray.nightly` stays light, for `xray --help`.

log = logging.getLogger(__name__)

BASELINE = "baseline.json"
LATEST = "latest.json"


@dataclass
class NightResult:
    """What one night did; `to_dict` is night.json."""

    night_id: str
    state_uri: str
    zoo: dict[str, Any]
    scan_uri: str
    run_id: str
    models_total: int
    models_planned: int
    models_scanned: int
    failures: int
    report_uri: str | None
    comparison: dict[str, str] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    regression: bool | None = None
    regressions: list[str] = field(default_factory=list)
    accepted: bool = False
    code_key: str = ""
    code_version: str = ""
    started_at: str = ""
    finished_at: str = ""

    @property
    def night_uri(self) -> str:
        return storage.join(self.state_uri, "nights", self.night_id)

    @property
    def exit_code(self) -> int:
        return 1 if self.regression else 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "exit_code": self.exit_code}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_night_id() -> str:
    return _now().strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def round_is_current(round_uri: str, recipe: Recipe) -> bool:
    """True when `round_uri` holds every model of `recipe` (trained or recorded failed) and its
    round.json names the recipe's digest: nothing to build."""
    from xray.zoo import round as round_writer

    info_uri = storage.join(round_uri, "round.json")
    if not storage.exists(info_uri):
        return False
    try:
        info = json.loads(storage.read_text(info_uri))
    except ValueError:
        return False
    if info.get("recipe_digest") != recipe.digest:
        return False
    done = round_writer.completed_model_ids(round_uri) | round_writer.failed_model_ids(round_uri)
    return {s.model_id for s in recipe.model_specs()} <= done


def ensure_zoo(state_uri: str, recipe: Recipe, *, workers: int | None = None,
               show_progress: bool = False) -> dict[str, Any]:
    """The recipe's round under <state>/zoo/, built only when absent or incomplete."""
    from xray.zoo.build import build_round

    round_uri = storage.join(state_uri, "zoo", f"{recipe.name}-{recipe.digest}")
    info = {"recipe": recipe.name, "recipe_digest": recipe.digest, "round_uri": round_uri,
            "manifest_uri": storage.join(round_uri, "manifest.csv"), "key": f"r{recipe.digest}"}
    if round_is_current(round_uri, recipe):
        log.info("zoo %s: recipe unchanged, nothing to build", round_uri)
        return {**info, "rebuilt": False, "trained": 0}
    result = build_round(recipe, round_uri, workers=workers, show_progress=show_progress)
    return {**info, "rebuilt": True, "trained": result.trained, "failed": len(result.failed)}


def _manifest_zoo(manifest_uri: str) -> dict[str, Any]:
    from xray.io.manifest import manifest_digest, read_manifest

    digest = manifest_digest(read_manifest(manifest_uri))
    return {"manifest_uri": str(manifest_uri), "manifest_digest": digest,
            "key": f"m{digest[:16]}", "rebuilt": False, "trained": 0}


def read_baseline(state_uri: str) -> dict[str, Any] | None:
    uri = storage.join(state_uri, BASELINE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def accept_night(state_uri: str, night: str = "latest") -> dict[str, Any]:
    """Point the baseline at a night's scan ("latest" = the newest night); returns the pointer."""
    uri = (storage.join(state_uri, LATEST) if night == "latest"
           else storage.join(state_uri, "nights", night, "night.json"))
    if not storage.exists(uri):
        raise FileNotFoundError(f"no night {night!r} under {state_uri} ({uri} is missing)")
    record = json.loads(storage.read_text(uri))
    pointer = {"scan_uri": record["scan_uri"], "night_id": record["night_id"],
               "run_id": record["run_id"], "zoo": record["zoo"], "code_key": record["code_key"],
               "code_version": record["code_version"],
               "accepted_at": _now().isoformat(timespec="seconds")}
    storage.write_text(storage.join(state_uri, BASELINE), json.dumps(pointer, indent=2) + "\n")
    return pointer


def run_nightly(state_uri: str, *, recipe: Recipe | str | None = None,
                manifest: str | None = None, config: Any = None, tolerances: Any = None,
                accept: bool = False, rescan: str = "code", address: str | None = None,
                workers: int | None = None,
                report: Mapping[str, Any] | None = None, show_progress: bool = False,
                night_id: str | None = None) -> NightResult:
    """One night (module docstring). recipe: a Recipe, a recipe file or a recipe name; or
    manifest: a manifest URI / round directory. config: a ScanConfig (default: the default
    config). tolerances: a compare.ToleranceSet (default: the documented defaults). report:
    keyword arguments for render_report (e.g. {"planes": 0}); None = its defaults."""
    from xray.config import ScanConfig
    from xray.reduce.compare import ToleranceSet, compare
    from xray.reduce.report import render_report
    from xray.runner import run_scan

    if (recipe is None) == (manifest is None):
        raise ValueError("run_nightly needs exactly one of recipe= and manifest=")
    if rescan not in ("code", "config"):
        raise ValueError(f"rescan must be 'code' or 'config', got {rescan!r}")
    started = _now()
    night_id = night_id or new_night_id()
    config = config or ScanConfig()
    if recipe is not None:
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
        zoo = ensure_zoo(state_uri, recipe, workers=workers, show_progress=show_progress)
    else:
        zoo = _manifest_zoo(manifest)
    key = code_key()
    folder = f"{zoo['key']}-c{config.config_hash}" + (f"-k{key}" if rescan == "code" else "")
    scan_uri = storage.join(state_uri, "scans", folder)
    summary = run_scan(zoo["manifest_uri"], scan_uri, config, address=address,
                       show_progress=show_progress)
    night = NightResult(
        night_id=night_id, state_uri=str(state_uri), zoo=zoo, scan_uri=scan_uri,
        run_id=summary.run_id, models_total=summary.models_total,
        models_planned=summary.models_planned, models_scanned=summary.models_scanned,
        failures=summary.failures, report_uri=None, code_key=key, code_version=code_version(),
        started_at=started.isoformat(timespec="seconds"))
    night_uri = night.night_uri

    baseline = read_baseline(state_uri)
    night.baseline = baseline
    if baseline is not None:
        result = compare(baseline["scan_uri"], scan_uri, tolerances or ToleranceSet())
        for fmt, ext in (("text", "txt"), ("markdown", "md"), ("json", "json")):
            uri = storage.join(night_uri, f"comparison.{ext}")
            storage.write_text(uri, result.format(fmt))
            night.comparison[fmt] = uri
        night.regression = result.regression
        night.regressions = list(result.regressions)
    night.report_uri = render_report(scan_uri, html_path=storage.join(night_uri, "report.html"),
                                     **dict(report or {}))
    night.finished_at = _now().isoformat(timespec="seconds")
    text = json.dumps(night.to_dict(), indent=2) + "\n"
    storage.write_text(storage.join(night_uri, "night.json"), text)
    storage.write_text(storage.join(state_uri, LATEST), text)
    if accept:
        accept_night(state_uri, night_id)
        night.accepted = True
        text = json.dumps(night.to_dict(), indent=2) + "\n"
        storage.write_text(storage.join(night_uri, "night.json"), text)
        storage.write_text(storage.join(state_uri, LATEST), text)
    return night


def describe(night: NightResult) -> str:
    """A few lines for a log: what was built, scanned, compared, and where to look."""
    zoo = night.zoo
    built = f"rebuilt, {zoo.get('trained', 0)} trained" if zoo.get("rebuilt") else "unchanged"
    lines = [f"night {night.night_id}",
             f"  zoo: {zoo.get('round_uri') or zoo.get('manifest_uri')} ({built})",
             f"  scan: {night.scan_uri}: {night.models_scanned} of {night.models_total} models "
             f"scanned ({night.models_total - night.models_planned} already scored), "
             f"{night.failures} with errors"]
    if night.baseline is None:
        lines.append("  comparison: no baseline yet (accept a night to set one)")
    else:
        verdict = "REGRESSION" if night.regression else "clean"
        lines.append(f"  comparison with night {night.baseline.get('night_id')}: {verdict}")
        lines += [f"    {r}" for r in night.regressions]
        lines.append(f"  comparison: {night.comparison.get('text')}")
    lines.append(f"  report: {night.report_uri}")
    if night.accepted:
        lines.append("  accepted: the baseline now points at this night's scan")
    return "\n".join(lines)
