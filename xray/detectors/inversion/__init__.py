"""Trigger inversion: the batched optimisation core and the scanners built on it.

core: TriggerCandidate, apply_filter, measure_reasr, PatchOptimizer, BatchedAdam, CostSchedule.
nc (Neural Cleanse), abs (ABS), karm (K-Arm), tabor (TABOR): detectors registered as "nc", "abs",
"karm", "tabor".
Importing this package registers nothing; xray.detectors (its __init__) imports the scanners.
"""
from xray.detectors.inversion.core import (TriggerCandidate, apply_filter,  # noqa: F401
                                           measure_reasr)
