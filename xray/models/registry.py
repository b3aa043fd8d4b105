"""Build a classifier by architecture name, with class count and input shape as parameters.

A name is an in-project net (registered here), a torchvision classifier (`resnet18` or
`torchvision:resnet18`) or a timm model (`timm:resnet10t`). timm is an optional extra
(`pip install 'xray[timm]'`), imported only when a `timm:` name is asked for. Every network is
built freshly initialised and offline: its weights come from the model file, never from a hub.
"""
from __future__ import annotations

import fnmatch
import sys
from types import ModuleType
from typing import Any, Callable

import torch.nn as nn

from xray._registry import Registry, did_you_mean

Builder = Callable[[int, tuple[int, int, int]], nn.Module]
ARCHITECTURES: Registry[Builder] = Registry("architecture")
register = ARCHITECTURES.register

_TORCHVISION_PREFIX = "torchvision:"
# googlenet / inception_v3 are built without auxiliary heads, as TrojAI trained them.
_TORCHVISION_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}
TIMM_PREFIX = "timm:"
TIMM_INSTALL = "pip install 'xray[timm]'"


def _tvm() -> ModuleType:
    # Imported on first use: torchvision pulls in torch._dynamo (~1.6 s a process), which a
    # scan actor or a zoo worker of in-project nets never needs.
    import torchvision.models

    return torchvision.models


def imported_torchvision_models() -> ModuleType | None:
    """torchvision.models if this process has imported it, else None. No torchvision network
    exists before it is imported, so `isinstance(net, <torchvision class>)` checks can be
    skipped when this is None instead of importing torchvision to answer False."""
    return sys.modules.get("torchvision.models")


def _torchvision_name(name: str) -> str | None:
    tvm = _tvm()
    bare = name[len(_TORCHVISION_PREFIX):] if name.startswith(_TORCHVISION_PREFIX) else name
    if bare in tvm.list_models(module=tvm):
        return bare
    return None


def _timm() -> Any:
    """The timm module; an ImportError naming the extra when it is not installed."""
    try:
        import timm
    except ImportError:
        raise ImportError(f"timm architectures need timm, an optional extra of xray: "
                          f"{TIMM_INSTALL}") from None
    return timm


def _timm_problem(timm: Any, bare: str) -> str | None:
    # is_model knows registered names (with or without a pretrained tag, `resnet10t.c3_in1k`)
    # and nothing else: `hf-hub:` / `local-dir:` names, which would read a config from the hub
    # or a folder, are unknown here.
    if timm.is_model(bare):
        return None
    hint = did_you_mean(bare, timm.list_models()) or ";"
    return f"unknown timm model {bare!r}{hint} timm.list_models() lists them"


def unknown_reason(name: str) -> str | None:
    """Why `create` cannot build `name` (an unknown name, or timm not installed), or None."""
    if name.startswith(TIMM_PREFIX):
        try:
            timm = _timm()
        except ImportError as e:
            return f"architecture {name!r}: {e}"
        return _timm_problem(timm, name[len(TIMM_PREFIX):])
    if name in ARCHITECTURES or _torchvision_name(name) is not None:
        return None
    tvm = _tvm()
    hint = did_you_mean(name, ARCHITECTURES.available() + tvm.list_models(module=tvm)) or ";"
    return (f"unknown architecture {name!r}{hint} in-project: "
            f"{', '.join(ARCHITECTURES.available())}, or any torchvision classifier "
            f"(resnet18 or torchvision:resnet18), or timm:<name> ({TIMM_INSTALL})")


def is_known(name: str) -> bool:
    return unknown_reason(name) is None


def available(pattern: str = "*") -> list[str]:
    """In-project, torchvision and (when installed) timm names matching a wildcard pattern."""
    tvm = _tvm()
    names = [_TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]
    try:
        names += [TIMM_PREFIX + n for n in _timm().list_models()]
    except ImportError:
        pass
    return ARCHITECTURES.available(pattern) + [n for n in names if fnmatch.fnmatch(n, pattern)]


def _create_timm(bare: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    timm = _timm()
    problem = _timm_problem(timm, bare)
    if problem:
        raise KeyError(problem)
    extra: dict[str, Any] = {}
    cfg = timm.models.get_pretrained_cfg(bare)
    # Models with a fixed input size (ViTs, ...) size their position embeddings from img_size;
    # others take no such argument.
    if getattr(cfg, "fixed_input_size", False) and tuple(cfg.input_size[1:]) != input_shape[1:]:
        extra["img_size"] = input_shape[1:]
    return timm.create_model(bare, pretrained=False, num_classes=num_classes,
                             in_chans=input_shape[0], **extra)


def create(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A freshly initialised network; raises KeyError naming the valid choices if unknown, and
    ImportError naming the extra for a `timm:` name without timm installed."""
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    if name in ARCHITECTURES:
        return ARCHITECTURES.get(name)(int(num_classes), input_shape)
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX):], int(num_classes), input_shape)
    tv_name = _torchvision_name(name)
    if tv_name is None:
        raise KeyError(unknown_reason(name))
    if input_shape[0] != 3:
        raise ValueError(f"torchvision architecture {tv_name!r} expects 3 input channels, "
                         f"got input_shape {input_shape}")
    return _tvm().get_model(tv_name, weights=None, num_classes=int(num_classes),
                         **_TORCHVISION_EXTRA.get(tv_name, {}))
