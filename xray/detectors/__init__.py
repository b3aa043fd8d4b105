"""Detectors: a registry by name (`available`, `get`, `build`) over one-file-per-algorithm modules.

Importing this package registers the built-in detectors: each module below files its class
with `register` (xray.detectors._registry) when imported.
"""
from xray.detectors._registry import DETECTORS, available, build, get, register  # noqa: F401
from xray.detectors.base import (DetectorResult, ScanContext, ScanData,  # noqa: F401
                                 params_hash)
import xray.detectors.inversion.abs  # noqa: F401
import xray.detectors.inversion.karm  # noqa: F401
import xray.detectors.inversion.nc  # noqa: F401
import xray.detectors.inversion.tabor  # noqa: F401
from xray.detectors import (ban, btidbf, composed, mmbd, mntd, modelxray,  # noqa: F401
                            trodo, weights)
