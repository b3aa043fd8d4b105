"""MNTD's two target-model attacks, M (patch) and B (blend), drawn like the jumbo shadows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import register
from xray.zoo.attacks.jumbo import Jumbo


@register
@dataclass(frozen=True, kw_only=True)
class MntdPatch(Jumbo):
    """MNTD's target-model attack M: the jumbo patch with p in {2..5} and alpha 1.

    See docs/algorithms/baselines.md "MNTD"."""

    name: ClassVar[str] = "mntd_m"

    @classmethod
    def _sizes(cls, side: int) -> list[int]:
        return [2, 3, 4, 5]

    @staticmethod
    def _patch_alpha(rng: np.random.Generator) -> float:
        return 1.0


@register
@dataclass(frozen=True, kw_only=True)
class MntdBlend(Jumbo):
    """MNTD's target-model attack B: full-image blend, alpha ~ U(0.05, 0.2).

    See docs/algorithms/baselines.md "MNTD"."""

    name: ClassVar[str] = "mntd_b"

    @classmethod
    def _sizes(cls, side: int) -> list[int]:
        return [side]
