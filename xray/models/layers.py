"""Split a classifier at an inner layer: model(x) == g(h(x)), h = input -> layer, g = the rest.

ABS stimulates, and EX-RAY mixes, the output of one inner block (docs/algorithms/exray.md
"Layer", paper Table 11). `split_model` rewrites each registered architecture as a flat list of
stages whose sequential composition is the network's forward, marks the stages that end a
top-level block of the architecture's main type, and cuts after the chosen one:

    family                     blocks (position "second_last" is the block the spec names)
    torchvision ResNet / WRN   layer1 .. layer4                        -> layer3
    PreActResNet (in-project)  layer1 .. layer4                        -> layer3
    VGG (with BN)              every BatchNorm2d in features           -> second-to-last BN
    VGG (no BN) (inferred)     every Conv2d in features                -> second-to-last conv
    DenseNet                   BatchNorm2d of features, transitions
                               flattened (norm0, t1.norm, t2.norm,
                               t3.norm, norm5)                          -> transition3.norm
    Inception3                 Mixed_5b .. Mixed_7c                     -> Mixed_7b
    GoogLeNet                  inception3a .. inception5b               -> inception5a
    MobileNetV2                InvertedResidual in features             -> second-to-last
    ShuffleNetV2               InvertedResidual of stage2..4, flattened -> second-to-last
    SqueezeNet                 Fire in features                         -> second-to-last Fire
    MNTD CNNs (inferred)       a conv block = a Conv2d and the modules
                               after it up to the next Conv2d (its ReLU
                               and pool); named by its last module      -> second-to-last block
    NiN (inferred)             the mlpconv blocks features.0 / .2 / .4  -> features.2
    other torchvision nets
    with `features` (inferred) top-level children of features          -> second-to-last child

Positions: "last" = the last block, "second_last" (default; also "second last") = the one
before it, "middle" = block (n - 1) // 2 (inferred; for ResNet layer2).

h and g share the model's modules (no copy): eval/train mode and devices follow the model. If
`model` is the loading wrapper `Normalized` (attribute .net), h starts with its (x - mean) / std,
so both take what the wrapper takes (pixel space) and `layer_name` is the module path inside
`model` ("net.layer3"), so `model.get_submodule(layer_name)` is the layer whose output h returns.
g never changes its input in place (a leading in-place activation is preceded by a copy), so a
caller may keep h's output and feed mixes of it to g repeatedly.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn as nn

from xray.models import nets
from xray.models.normalize import Normalize, Normalized
from xray.models.registry import imported_torchvision_models

POSITIONS = ("middle", "second_last", "last")


class _Copy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _Mean(nn.Module):
    """x.mean([2, 3]): ShuffleNetV2's global pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean([2, 3])


class _TransformInput(nn.Module):
    """Inception3 / GoogLeNet `_transform_input` (a no-op unless transform_input is set)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._fn = net._transform_input  # bound method; not a submodule, no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class Stages(nn.Sequential):
    """An nn.Sequential that remembers the model path of the module each stage stands for."""

    def __init__(self, stages: list[tuple[str, nn.Module]]) -> None:
        super().__init__(*(m for _, m in stages))
        self.paths = [p for p, _ in stages]


def _children(prefix: str, seq: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}", m) for n, m in seq.named_children()]


def _indices(stages: list[tuple[str, nn.Module]], kind: type | tuple[type, ...]) -> list[int]:
    return [i for i, (_, m) in enumerate(stages) if isinstance(m, kind)]


def _conv_block_ends(stages: list[tuple[str, nn.Module]], prefix: str) -> list[int]:
    """Indices of the last stage of each conv block inside `prefix` (MNTD CNNs)."""
    inside = [i for i, (p, _) in enumerate(stages) if p.startswith(prefix + ".")]
    convs = [i for i in inside if isinstance(stages[i][1], nn.Conv2d)]
    return [nxt - 1 for nxt in convs[1:]] + [inside[-1]] if convs else []


def _torchvision_plan(net: nn.Module, tvm: ModuleType
                      ) -> tuple[list[tuple[str, nn.Module]], list[int]] | None:
    """plan() of the torchvision classes named here, None for any other net."""
    flat = nn.Flatten(1)
    if isinstance(net, tvm.ResNet):
        stages = [(n, getattr(net, n)) for n in ("conv1", "bn1", "relu", "maxpool", "layer1",
                                                  "layer2", "layer3", "layer4", "avgpool")]
        stages += [("<flatten>", flat), ("fc", net.fc)]
        return stages, [4, 5, 6, 7]
    if isinstance(net, tvm.VGG):
        stages = _children("features", net.features)
        blocks = _indices(stages, nn.BatchNorm2d) or _indices(stages, nn.Conv2d)
        stages += [("avgpool", net.avgpool), ("<flatten>", flat), ("classifier", net.classifier)]
        return stages, blocks
    if isinstance(net, tvm.DenseNet):
        stages = []
        for name, m in net.features.named_children():
            if isinstance(m, tvm.densenet._Transition):
                stages += _children(f"features.{name}", m)
            else:
                stages.append((f"features.{name}", m))
        blocks = _indices(stages, nn.BatchNorm2d)
        stages += [("<relu>", nn.ReLU()), ("<avgpool>", nn.AdaptiveAvgPool2d((1, 1))),
                   ("<flatten>", flat), ("classifier", net.classifier)]
        return stages, blocks
    if isinstance(net, tvm.Inception3):
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c", "avgpool", "dropout"]
        stages = [("<transform_input>", _TransformInput(net))]
        stages += [(n, getattr(net, n)) for n in names]
        stages += [("<flatten>", flat), ("fc", net.fc)]
        return stages, [i for i, (p, _) in enumerate(stages) if p.startswith("Mixed_")]
    if isinstance(net, tvm.GoogLeNet):
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
                 "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
                 "inception4e", "maxpool4", "inception5a", "inception5b", "avgpool"]
        stages = [("<transform_input>", _TransformInput(net))]
        stages += [(n, getattr(net, n)) for n in names]
        stages += [("<flatten>", flat), ("dropout", net.dropout), ("fc", net.fc)]
        return stages, [i for i, (p, _) in enumerate(stages) if p.startswith("inception")]
    if isinstance(net, tvm.MobileNetV2):
        stages = _children("features", net.features)
        blocks = _indices(stages, tvm.mobilenetv2.InvertedResidual)
        stages += [("<avgpool>", nn.AdaptiveAvgPool2d((1, 1))), ("<flatten>", flat),
                   ("classifier", net.classifier)]
        return stages, blocks
    if isinstance(net, tvm.ShuffleNetV2):
        stages = [("conv1", net.conv1), ("maxpool", net.maxpool)]
        for s in ("stage2", "stage3", "stage4"):
            stages += _children(s, getattr(net, s))
        blocks = _indices(stages, tvm.shufflenetv2.InvertedResidual)
        stages += [("conv5", net.conv5), ("<mean>", _Mean()), ("fc", net.fc)]
        return stages, blocks
    if isinstance(net, tvm.SqueezeNet):
        stages = _children("features", net.features)
        blocks = _indices(stages, tvm.squeezenet.Fire)
        stages += [("classifier", net.classifier), ("<flatten>", flat)]
        return stages, blocks
    return None


def plan(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """(stages, block_ends): stages compose to net's forward; block_ends index the main blocks."""
    tvm = imported_torchvision_models()  # None: net is no torchvision class
    found = _torchvision_plan(net, tvm) if tvm is not None else None
    if found is not None:
        return found
    flat = nn.Flatten(1)
    if isinstance(net, nets.PreActResNet):
        stages = [(n, getattr(net, n)) for n in ("conv1", "layer1", "layer2", "layer3", "layer4",
                                                  "bn")]
        stages += [("<relu>", nn.ReLU()), ("avgpool", net.avgpool), ("<flatten>", flat),
                   ("linear", net.linear)]
        return stages, [1, 2, 3, 4]
    if isinstance(net, (nets.MNTDMnistCNN, nets.MNTDCifarCNN)):
        stages = _children("features", net.features) + _children("classifier", net.classifier)
        return stages, _conv_block_ends(stages, "features")
    if isinstance(net, nets.NiN):
        stages = _children("features", net.features) + _children("classifier", net.classifier)
        return stages, _indices(stages, nn.Sequential)
    features, classifier = getattr(net, "features", None), getattr(net, "classifier", None)
    if isinstance(features, nn.Sequential) and isinstance(classifier, nn.Module):
        # (inferred) features -> [avgpool] -> flatten unless the classifier flattens -> classifier
        # (EfficientNet, MobileNetV3, AlexNet, ConvNeXt): blocks = features' children.
        stages = _children("features", features)
        blocks = list(range(len(stages)))
        if isinstance(getattr(net, "avgpool", None), nn.Module):
            stages.append(("avgpool", net.avgpool))
        if not any(isinstance(m, nn.Flatten) for m in classifier.modules()):
            stages.append(("<flatten>", flat))
        stages.append(("classifier", classifier))
        return stages, blocks
    raise NotImplementedError(
        f"split_model: no layer plan for {type(net).__name__}; supported: ResNet/WideResNet, "
        "PreActResNet, VGG, DenseNet, Inception3, GoogLeNet, MobileNetV2, ShuffleNetV2, "
        "SqueezeNet, MNTD CNNs, NiN, and torchvision nets with features + classifier")


def block_index(n_blocks: int, position: str) -> int:
    pos = position.replace(" ", "_").replace("-", "_")
    if n_blocks < 1:
        raise ValueError("split_model: the architecture has no blocks to split at")
    if pos == "last":
        return n_blocks - 1
    if pos == "second_last":
        return max(n_blocks - 2, 0)
    if pos == "middle":
        return (n_blocks - 1) // 2
    raise ValueError(f"unknown layer position {position!r}; expected one of {', '.join(POSITIONS)}")


def split_model(model: nn.Module, position: str = "second_last"
                ) -> tuple[nn.Module, nn.Module, str]:
    """(h, g, layer_name) with g(h(x)) == model(x); h's output is `layer_name`'s output.

    `model` is a bare network or the `Normalized` loading wrapper (h then normalises first and
    layer_name is prefixed "net."). Raises NotImplementedError for an architecture without a plan.
    """
    net, prefix, head = model, "", []
    if isinstance(model, Normalized):
        net, prefix = model.net, "net."
        head = [("<normalize>", Normalize(model.mean, model.std))]
    stages, blocks = plan(net)
    cut = blocks[block_index(len(blocks), position)]
    layer_name = prefix + stages[cut][0]
    front = head + [(p if p.startswith("<") else prefix + p, m) for p, m in stages[:cut + 1]]
    back = [(p if p.startswith("<") else prefix + p, m) for p, m in stages[cut + 1:]]
    if back and getattr(back[0][1], "inplace", False):
        back.insert(0, ("<copy>", _Copy()))
    return Stages(front), Stages(back), layer_name
