"""In-project architectures: the MNTD CNNs, a NiN-style net, PreActResNet-18/34.

Each builder takes (num_classes, input_shape=(C, H, W)); spatial sizes are derived, not assumed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from xray.models.registry import register


def _flat_features(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


class MNTDMnistCNN(nn.Module):
    """MNTD's MNIST CNN (ref model_lib/mnist_cnn_model.py):
    conv5(16)-pool-conv5(32)-pool-fc512-fc."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(_flat_features(self.features, input_shape), 512), nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MNTDCifarCNN(nn.Module):
    """MNTD's CIFAR-10 CNN (ref model_lib/cifar10_cnn_model.py), padding 1 throughout."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(_flat_features(self.features, input_shape), 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class NiN(nn.Module):
    """A small Network-in-Network: mlpconv blocks (3x3 conv + two 1x1 convs), global average
    pool."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 width: int = 48) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int, pad: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, padding=pad), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(),
            )

        c = input_shape[0]
        self.features = nn.Sequential(
            block(c, width, 5, 2), nn.MaxPool2d(2),
            block(width, 2 * width, 3, 1), nn.MaxPool2d(2),
            block(2 * width, 2 * width, 3, 1),
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(2 * width, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet (the seeds' CIFAR-10 model, BackdoorBench models/preact_resnet.py)."""

    def __init__(self, num_blocks: list[int], num_classes: int,
                 input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(F.relu(self.bn(out)))
        return self.linear(torch.flatten(out, 1))


register("mntd_mnist_cnn")(MNTDMnistCNN)
register("mntd_cifar_cnn")(MNTDCifarCNN)
register("nin")(NiN)
register("preact_resnet18")(lambda k, s: PreActResNet([2, 2, 2, 2], k, s))
register("preact_resnet34")(lambda k, s: PreActResNet([3, 4, 6, 3], k, s))
