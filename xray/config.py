"""The run config: which detectors, with which parameters, on which examples and seed.

    seed: 0
    examples_per_class: null          # cap on clean examples per class (null = all)
    detectors:
      modelxray: {preset: small}      # preset and/or params overriding the detector's Params
      nc: {params: {steps: 50}}
    stages:                           # optional: a cascade (xray.pipeline.run_cascade)
      - detectors: [mmbd]             # stage 1: every model
        calibrator: cheap.json        # its probability, from stage-1 scores (xray calibrate)
        uncertain: [0.2, 0.8]         # models with a probability in this band go on
      - detectors: [modelxray, nc]    # stage 2: only those
        calibrator: all.json          # their final probability (none: the default map)

Its hash (per detector: name, version, parameters, seed, example cap) identifies results: rows
scored under the same hash are never scanned again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from xray import detectors as detector_registry
from xray.detectors.base import hashed_params
from xray.io import storage

DEFAULT_DETECTORS = ("modelxray",)


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    preset: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    def build(self) -> Any:
        return detector_registry.build(self.name, dict(self.params), self.preset)


@dataclass(frozen=True)
class Stage:
    """One stage of a cascade: its detectors run on the models the earlier stages left
    uncertain (stage 1: every model). `calibrator` (a URI; None = the default map) turns the
    scores of this stage's and every earlier stage's detectors into a probability; a model
    goes on to the next stage when that probability lies in `uncertain` (lo, hi), or is among
    the `uncertain_share` of this stage's models whose probability is nearest 0.5. The last
    stage has neither: its probability is final."""
    detectors: tuple[str, ...]
    calibrator: str | None = None
    uncertain: tuple[float, float] | None = None
    uncertain_share: float | None = None


@dataclass(frozen=True)
class ScanConfig:
    detectors: tuple[DetectorSpec, ...] = tuple(DetectorSpec(n) for n in DEFAULT_DETECTORS)
    seed: int = 0
    examples_per_class: int | None = None
    # Not part of the hash: they change where / whether a model runs, not its scores.
    # allow_pickle only ever comes from the person running the command (--allow-pickle or the
    # explicit Python argument): never from a config file, a stored run or a calibrator.
    allow_pickle: bool = False
    device: str = "auto"  # auto | cpu | cuda
    model_time_limit_s: float | None = None
    # A cascade (xray.pipeline.run_cascade); () = every detector on every model. Stages choose
    # which models a detector runs on, never its scores: not part of any detector's hash.
    stages: tuple[Stage, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def detector_hash(self, detector: Any) -> str:
        payload = {"detector": detector.name, "version": detector.version,
                   "params": hashed_params(detector.params), "seed": self.seed,
                   "examples_per_class": self.examples_per_class}
        return stable_hash(payload)

    def to_json(self) -> str:
        return json.dumps({
            "seed": self.seed, "examples_per_class": self.examples_per_class,
            "detectors": {d.name: {"preset": d.preset, "params": dict(d.params)}
                          for d in self.detectors},
            "allow_pickle": self.allow_pickle, "device": self.device,
            "model_time_limit_s": self.model_time_limit_s,
            **({"stages": [stage_dict(s) for s in self.stages]} if self.stages else {})},
            sort_keys=True)

    def only(self, names: Sequence[str]) -> "ScanConfig":
        """The same config with only the detectors `names` (in this config's order), no stages."""
        return dataclasses.replace(
            self, detectors=tuple(d for d in self.detectors if d.name in set(names)), stages=())

    @property
    def config_hash(self) -> str:
        built = [d.build() for d in self.detectors]
        return stable_hash({"detectors": sorted(self.detector_hash(d) for d in built)})


def stable_hash(payload: Any) -> str:
    """16 hex digits of the SHA-256 of `payload` as sorted JSON: identities of configs."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_CONFIG_KEYS = {"seed", "examples_per_class", "detectors", "device", "model_time_limit_s",
                "stages"}
_STAGE_KEYS = {"detectors", "calibrator", "uncertain", "uncertain_share"}


def stage_dict(stage: Stage) -> dict[str, Any]:
    """A stage as the config file writes it (keys that are set only)."""
    out: dict[str, Any] = {"detectors": list(stage.detectors)}
    if stage.calibrator is not None:
        out["calibrator"] = stage.calibrator
    if stage.uncertain is not None:
        out["uncertain"] = list(stage.uncertain)
    if stage.uncertain_share is not None:
        out["uncertain_share"] = stage.uncertain_share
    return out


def parse_stages(raw: Any, detector_names: Sequence[str], source: str) -> tuple[Stage, ...]:
    """The `stages` list of a config: every detector of the config in exactly one stage, each
    stage but the last with one rule (uncertain band or uncertain_share), the last with none."""
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{source}: stages: a list of stages expected, got {type(raw).__name__}")
    stages, seen = [], set()
    for i, entry in enumerate(raw):
        where = f"{source}: stages[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: a mapping with 'detectors' expected")
        bad = sorted(set(entry) - _STAGE_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown key {bad[0]!r}; valid: {sorted(_STAGE_KEYS)}")
        names = entry.get("detectors")
        if isinstance(names, str):
            names = [names]
        if not names:
            raise ValueError(f"{where}.detectors: at least one detector expected")
        for name in names:
            if name not in detector_names:
                raise ValueError(f"{where}.detectors: {name!r} is not one of the config's "
                                 f"detectors ({', '.join(detector_names)})")
            if name in seen:
                raise ValueError(f"{where}.detectors: {name!r} is already in an earlier stage")
            seen.add(name)
        last = i == len(raw) - 1
        band, share = entry.get("uncertain"), entry.get("uncertain_share")
        if last and (band is not None or share is not None):
            raise ValueError(f"{where}: the last stage decides every model it runs on; "
                             "'uncertain' / 'uncertain_share' belong to earlier stages")
        if not last and (band is None) == (share is None):
            raise ValueError(f"{where}: give one of 'uncertain: [lo, hi]' (a probability band) "
                             "or 'uncertain_share: q' (the share of models nearest 0.5)")
        if band is not None:
            try:
                lo, hi = (float(v) for v in band)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.uncertain: [lo, hi] expected, got {band!r}") from None
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{where}.uncertain: 0 <= lo <= hi <= 1 required, got {band!r}")
            band = (lo, hi)
        if share is not None:
            share = float(share)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{where}.uncertain_share: a share in [0, 1] expected")
        calibrator = entry.get("calibrator")
        stages.append(Stage(tuple(names), None if calibrator is None else str(calibrator),
                            band, share))
    unstaged = [n for n in detector_names if n not in seen]
    if unstaged:
        raise ValueError(f"{source}: stages: {', '.join(unstaged)} in no stage (every detector "
                         "of the config runs in one)")
    return tuple(stages)


class PickleNotAConfigSetting(ValueError):
    """A config file tried to turn on pickle loading."""


def parse_config(raw: dict[str, Any] | None, source: str = "<config>",
                 detector_names: list[str] | None = None, *, allow_pickle: bool = False,
                 stored: bool = False) -> ScanConfig:
    """A ScanConfig from a dict; `detector_names` (from --detectors) selects which detectors run,
    taking their settings from the file when it has them. Every detector is built once here so a
    bad name, preset or parameter fails before any work starts.

    allow_pickle: the caller's own switch (the command line's --allow-pickle), the only way to
    turn pickle loading on. stored=True reads a config recorded by xray (a run, a calibrator):
    its recorded allow_pickle is ignored. In any other dict, an allow_pickle key is an error."""
    raw = dict(raw or {})
    if "allow_pickle" in raw and not stored:
        raise PickleNotAConfigSetting(
            f"{source}: allow_pickle is not a config setting: pickle loading runs the file's "
            "code, so only the command line (--allow-pickle) can allow it")
    # A stored config (runs.config_json, a calibrator's scan) records whether that run allowed
    # pickles; reading it back never turns them on.
    raw.pop("allow_pickle", None)
    unknown = sorted(set(raw) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; valid: {sorted(_CONFIG_KEYS)}")
    settings = raw.get("detectors") or {}
    if isinstance(settings, list):
        settings = {name: {} for name in settings}
    names = detector_names or list(settings) or list(DEFAULT_DETECTORS)
    specs = []
    for name in names:
        entry = dict(settings.get(name) or {})
        bad = sorted(set(entry) - {"preset", "params"})
        if bad:
            raise ValueError(f"{source}: detectors.{name}: unknown key {bad[0]!r} "
                             f"(valid: preset, params)")
        spec = DetectorSpec(name, entry.get("preset"),
                            tuple(sorted((entry.get("params") or {}).items())))
        where = f"{source}: detectors.{name}" if name in settings else "--detectors"
        try:
            spec.build()
        except KeyError as err:  # an unknown name, preset or parameter, named where it came from
            raise ValueError(f"{where}: {err.args[0]}") from None
        except ValueError as err:  # a value the detector refuses (mntd without an artifact);
            # a run recorded before the detector refused it stays readable (explain, report)
            if not stored:
                raise ValueError(f"{where}: {err.args[0]}") from None
        specs.append(spec)
    stages = parse_stages(raw.get("stages"), [s.name for s in specs], source)
    limit = raw.get("model_time_limit_s")
    if not stored and limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        # a limit of 0 or below would time out every model before it starts (a run recorded
        # with one before this check stays readable)
        raise ValueError(f"{source}: model_time_limit_s must be a positive number of seconds "
                         f"(--time-limit), not {limit!r}")
    return ScanConfig(
        detectors=tuple(specs), seed=int(raw.get("seed", 0)), stages=stages,
        examples_per_class=raw.get("examples_per_class"),
        allow_pickle=bool(allow_pickle), device=str(raw.get("device", "auto")),
        model_time_limit_s=raw.get("model_time_limit_s"))


def load_config(uri: str | None, detector_names: list[str] | None = None, *,
                allow_pickle: bool = False, **overrides: Any) -> ScanConfig:
    """A config file (YAML), or the defaults when `uri` is None; `overrides` (None = keep) win
    over the file; allow_pickle as in parse_config."""
    try:
        raw = yaml.safe_load(storage.read_text(uri)) if uri else {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {uri} not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{uri}: not a YAML scan config ({err})") from None
    raw = {**(raw or {}), **{k: v for k, v in overrides.items() if v is not None}}
    return parse_config(raw, source=uri or "<defaults>", detector_names=detector_names,
                        allow_pickle=allow_pickle)


def with_preset(config: ScanConfig, preset: str) -> ScanConfig:
    """The same config with `preset` applied to every detector that defines it."""
    specs = []
    for spec in config.detectors:
        presets = getattr(detector_registry.get(spec.name), "presets", {})
        specs.append(dataclasses.replace(spec, preset=preset) if preset in presets else spec)
    if not any(s.preset == preset for s in specs):
        known = sorted({name for s in config.detectors
                        for name in getattr(detector_registry.get(s.name), "presets", {})})
        raise ValueError(f"no selected detector has a preset {preset!r}; their presets: "
                         f"{', '.join(known) or 'none'}")
    return dataclasses.replace(config, detectors=tuple(specs))
