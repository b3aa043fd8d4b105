"""Architecture registry: small in-project nets, any torchvision classifier and (with the
optional extra `xray[timm]`) any timm model, by name.

    create("mntd_mnist_cnn", num_classes=10, input_shape=(1, 28, 28))
    create("torchvision:resnet18", num_classes=5, input_shape=(3, 224, 224))  # or plain "resnet18"
    create("timm:resnet10t", num_classes=10, input_shape=(3, 32, 32))
"""
from xray.models.registry import (available, create, imported_torchvision_models,  # noqa: F401
                                  is_known, register, unknown_reason)
from xray.models import nets  # noqa: F401  (registers the in-project nets)
