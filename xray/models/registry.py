"""Build a classifier by architecture name, with class count and input shape as parameters."""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn
import torchvision.models as tvm

from xray._registry import Registry

Builder = Callable[[int, tuple[int, int, int]], nn.Module]
ARCHITECTURES: Registry[Builder] = Registry("architecture")
register = ARCHITECTURES.register

_TORCHVISION_PREFIX = "torchvision:"
# googlenet / inception_v3 are built without auxiliary heads, as TrojAI trained them.
_TORCHVISION_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}


def _torchvision_name(name: str) -> str | None:
    bare = name[len(_TORCHVISION_PREFIX):] if name.startswith(_TORCHVISION_PREFIX) else name
    if bare in tvm.list_models(module=tvm):
        return bare
    return None


def is_known(name: str) -> bool:
    return name in ARCHITECTURES or _torchvision_name(name) is not None


def available(pattern: str = "*") -> list[str]:
    tv = [_TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]
    return ARCHITECTURES.available(pattern) + [n for n in tv if fnmatch.fnmatch(n, pattern)]


def create(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A freshly initialised network; raises KeyError naming the valid choices if unknown."""
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    if name in ARCHITECTURES:
        return ARCHITECTURES.get(name)(int(num_classes), input_shape)
    tv_name = _torchvision_name(name)
    if tv_name is None:
        raise KeyError(f"unknown architecture {name!r}; in-project: "
                       f"{', '.join(ARCHITECTURES.available())}, or any torchvision classifier")
    if input_shape[0] != 3:
        raise ValueError(f"torchvision architecture {tv_name!r} expects 3 input channels, "
                         f"got input_shape {input_shape}")
    return tvm.get_model(tv_name, weights=None, num_classes=int(num_classes),
                         **_TORCHVISION_EXTRA.get(tv_name, {}))
