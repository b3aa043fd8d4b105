"""The detector contract: name, version, frozen Params, score(model, data, ctx).

A detector reads only its arguments: the model (an nn.Module in eval mode taking pixel-space
inputs in [0, 1], normalisation folded in), the clean example data, and a context carrying the
device, the seed and a logger. It never sees ground truth, never reads storage, never prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Protocol

import torch

from xray.models.normalize import channels, denormalize, normalize


@dataclass
class ScanData:
    """Clean examples as the model sees them, and the facts a real scan would have.

    x: float32 (N, C, H, W) in pixel space [0, 1]; y: int64 (N,) true labels from file names.
    mean / std: the model's normalisation (already folded into the model); detectors that must
    work in the model's normalised input space (Model X-ray) use them to go there and back.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    # The clean forward pass shared by the detectors of one scan (see clean_logits): the model
    # it was computed for (held to compare identity, not by id(), which Python may reuse) and
    # its logits; clean_forwards counts the passes computed, so a scan can show it shared one.
    _logits_of: tuple[torch.nn.Module, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False)
    clean_forwards: int = field(default=0, init=False, repr=False, compare=False)

    def clean_logits(self, model: torch.nn.Module) -> torch.Tensor:
        """Logits of every clean example, `model` in eval mode, no gradient, in batches of 256,
        on the examples' device. Computed once per model and data, then shared by every detector
        of a scan that needs it (ABS's runner-up labels, K-Arm's pre-screen), since scanning
        hands all of a model's detectors one ScanData: a detector gets the same tensor whether
        it runs alone or beside others. Detectors leave the model as they found it, so the
        logits stay valid for the next one."""
        if self._logits_of is None or self._logits_of[0] is not model:
            with eval_mode(model), torch.no_grad():
                logits = torch.cat([model(self.x[i:i + 256]) for i in range(0, len(self.x), 256)])
            self._logits_of = (model, logits)
            self.clean_forwards += 1
        return self._logits_of[1]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In the examples' dtype, on `like`'s device; one value broadcasts over the channels.
        return (channels(self.mean, dtype=self.x.dtype, device=like.device),
                channels(self.std, dtype=self.x.dtype, device=like.device))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, *self._stats(x))

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return denormalize(z, *self._stats(z))


class NotApplicable(ValueError):
    """The detector's method does not apply to this model (BAN: no BatchNorm layer; weights: no
    final classification layer of the class count; MNTD: a meta-classifier trained for another
    input shape or class count). Not a failure of the scan: scan_model records a final
    `not_applicable` row carrying this message (no traceback), which runs do not count as errors
    and do not retry. The message names what was looked for."""


class DetectorDidNoWork(RuntimeError):
    """A detector could not take a single step of its work, so it has no verdict to give.

    Raised instead of returning a score computed from an initial state. scan_model turns it into
    an `error` row (a `timeout` row for DeadlinePassed) carrying the reason."""


class DeadlinePassed(DetectorDidNoWork):
    """The model's time ran out before the detector's first step."""


class NoUsableExamples(DetectorDidNoWork):
    """The clean examples cannot drive the detector (none at all, or none of a needed class)."""


@dataclass
class ScanContext:
    """device, seed, logger, and the model's time allowance.

    deadline: seconds left for this model when the context was made (None: no limit). Loops ask
    `ctx.expired()` between steps; `ctx.seconds_left()` gives what remains, counted on a monotonic
    clock from `created`. A detector that stops early says so in its stats (stopped_early, and
    its steps), and raises DeadlinePassed when it could take no step at all.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("xray.detector"))
    deadline: float | None = None
    created: float = field(default_factory=time.monotonic)

    def generator(self, salt: str = "") -> torch.Generator:
        """A CPU generator seeded from the run seed and a salt (one stream per purpose)."""
        digest = hashlib.sha256(f"{self.seed}:{salt}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def seconds_left(self) -> float | None:
        """Seconds left for this model now (may be negative), or None without a limit."""
        if self.deadline is None:
            return None
        return float(self.deadline) - (time.monotonic() - self.created)

    def expired(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= 0

    def require_time(self, detector: str) -> None:
        """Raise DeadlinePassed when no time is left: called before a detector's first step."""
        if self.expired():
            raise DeadlinePassed(f"{detector}: the model's time limit ({self.deadline:g} s) "
                                 "ran out before the first optimisation step")


def require_steps(detector: str, steps: int, ctx: ScanContext) -> int:
    """Proof of work: `steps` (the optimisation steps a detector took) as an int, or a named
    error when it is 0, so no score is ever computed from an initial state."""
    steps = int(steps)
    if steps <= 0:
        if ctx.expired():
            raise DeadlinePassed(f"{detector}: the model's time limit ({ctx.deadline:g} s) ran "
                                 "out before the first optimisation step")
        raise DetectorDidNoWork(f"{detector}: took no optimisation step")
    return steps


@dataclass
class DetectorResult:
    """score: higher = more likely trojaned. stats: named statistics (numbers, lists, strings).
    triggers: per-candidate rows for the `triggers` table (dicts of plain values)."""

    score: float
    target: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # in-memory extras, e.g. planes


class Detector(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, params: Any) -> None: ...

    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult: ...


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """models in eval mode for the scan; every submodule's own mode is restored after (a
    detector must leave the model as it found it)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter and buffer (BatchNorm running statistics) and every module's mode put
    back as they were on leaving, whatever happened inside: for detectors that run the model in
    train() mode (BAN, BTI-DBF), which moves BatchNorm's running statistics."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)
        for m, mode in modes:
            m.training = mode


# Field metadata for a parameter added after results were stored with the detector's version:
# while it holds its default (the computation as before) it is left out of the hash, so rows
# scored before the field existed keep being reused instead of every model being scanned again.
HASHED_ONLY_IF_SET = "hashed_only_if_set"


def hashed_params(params: Any) -> dict[str, Any]:
    """The parameters that identify a detector's results: every field, except a
    HASHED_ONLY_IF_SET field that holds its default."""
    values = dataclasses.asdict(params)
    for f in dataclasses.fields(params):
        if f.metadata.get(HASHED_ONLY_IF_SET) and values[f.name] == f.default:
            del values[f.name]
    return values


def params_hash(name: str, version: str, params: Any) -> str:
    """Stable short hash of a detector's identity and parameters."""
    payload = json.dumps({"name": name, "version": version,
                          "params": hashed_params(params)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
