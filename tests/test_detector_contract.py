"""One contract over the registry (STYLE.md section 8): every detector has frozen, hashable
Params, gives a finite score on a tiny CPU net, the same score for the same seed, and opens no
file while scoring; an optimising detector proves its work (stats["steps"], an int > 0) and
refuses to answer when the model's time is already up. New detectors get these checks for
free."""
import dataclasses
import math
import sys

import pytest
import torch

from xray import detectors, models
from xray.detectors.ban import NoBatchNorm
from xray.detectors.base import DeadlinePassed, NotApplicable, ScanContext, ScanData
from xray.io.model_loading import Normalized

# Detectors that cannot be built from defaults alone, and why (checked in their own tests).
NEEDS_ARTIFACT: dict[str, str] = {}
# Detectors that optimise (trigger inversion, margin ascent, EX-RAY masks): they report their
# step count and cannot answer without steps. Model X-ray and MNTD are a fixed number of
# forward passes (no loop to cut short); weights reads the last layer (no forward at all).
OPTIMISING = {"nc", "abs", "karm", "nc+exray", "abs+exray", "karm+exray", "mmbd", "tabor",
              "trodo", "ban", "btidbf"}
# Detectors that need a trained artifact: the session fixture giving one for _tiny()'s net.
ARTIFACT_FIXTURES = {"mntd": "mntd_contract_artifact"}  # tests/_mntd_fixtures.py
# Detectors that apply only to some architectures: (a registered architecture they apply to,
# their named "not applicable" error, a NotApplicable). They must refuse _tiny()'s default net
# with that error, and the rest of the contract runs on a tiny net of the given architecture,
# so every check still applies to them. BAN perturbs BatchNorm layers; the MNTD CNN has none.
NOT_APPLICABLE_ON_DEFAULT = {"ban": ("nin", NoBatchNorm)}

_watching = {"on": False, "opened": []}


def _audit(event, args):
    if _watching["on"] and event == "open":
        _watching["opened"].append(args[0])


sys.addaudithook(_audit)


def _import_machinery(path):
    """Files Python's import system and package metadata read (lazy imports), not data."""
    return (path.startswith(("/proc", "/sys", "/dev", sys.prefix, sys.base_prefix))
            or path.endswith((".py", ".pyc", ".so"))
            or any(part in path for part in ("site-packages", ".egg-info", ".dist-info",
                                             "__editable__", "__pycache__")))


def _tiny(arch="mntd_mnist_cnn"):
    torch.manual_seed(0)
    net = Normalized(models.create(arch, 3, (3, 16, 16)), (0.5,), (0.25,)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(18, 3, 16, 16, generator=g)
    y = torch.arange(3).repeat_interleave(6)
    return net, ScanData(x=x, y=y, num_classes=3, mean=(0.5,), std=(0.25,))


def _names():
    return [pytest.param(n, marks=pytest.mark.skip(reason=NEEDS_ARTIFACT[n]))
            if n in NEEDS_ARTIFACT else n for n in detectors.available()]


@pytest.mark.parametrize("name", _names())
def test_detector_contract(name, request):
    cls = detectors.get(name)
    assert cls.name == name and isinstance(cls.version, str) and cls.version
    params = cls.Params()
    assert dataclasses.is_dataclass(params) and hash(params) is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(params, dataclasses.fields(params)[0].name, None)
    with pytest.raises(KeyError, match="no parameter 'not_a_param'"):
        detectors.build(name, {"not_a_param": 1})

    params = ({"artifact": request.getfixturevalue(ARTIFACT_FIXTURES[name])}
              if name in ARTIFACT_FIXTURES else None)
    detector = detectors.build(name, params, preset="small")
    net, data = _tiny()
    if name in NOT_APPLICABLE_ON_DEFAULT:
        arch, error = NOT_APPLICABLE_ON_DEFAULT[name]
        assert issubclass(error, NotApplicable)  # a not_applicable row in a scan
        with pytest.raises(error, match="not applicable"):
            detector.score(net, data, ScanContext(seed=3))
        net, data = _tiny(arch)
    _watching.update(on=True, opened=[])
    try:
        first = detector.score(net, data, ScanContext(seed=3))
        again = detector.score(net, data, ScanContext(seed=3))
    finally:
        _watching["on"] = False
    assert math.isfinite(first.score), f"{name} score {first.score}"
    assert first.score == again.score and first.target == again.target
    assert first.target is None or 0 <= first.target < data.num_classes
    opened = [p for p in map(str, _watching["opened"]) if not _import_machinery(p)]
    assert not opened, f"{name} opened files while scoring: {opened[:3]}"
    if name in OPTIMISING:
        steps = first.stats["steps"]
        assert isinstance(steps, int) and steps > 0, f"{name} steps {steps!r}"
        assert first.stats["stopped_early"] is False
        with pytest.raises(DeadlinePassed):
            detector.score(net, data, ScanContext(seed=3, deadline=0.0))
    else:
        assert name in ("modelxray", "mntd", "weights"), \
            f"{name}: add it to OPTIMISING or say why not"
