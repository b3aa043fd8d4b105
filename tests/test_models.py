"""The architecture registry builds every in-project net for the shapes the zoo uses."""
import pytest
import torch

from xray import models


@pytest.mark.parametrize("name,shape", [
    ("mntd_mnist_cnn", (1, 28, 28)),
    ("mntd_cifar_cnn", (3, 32, 32)),
    ("mntd_cifar_cnn", (3, 24, 24)),
    ("nin", (3, 32, 32)),
    ("preact_resnet18", (3, 32, 32)),
    ("preact_resnet34", (3, 32, 32)),
])
def test_in_project_nets_forward(name, shape):
    net = models.create(name, num_classes=7, input_shape=shape).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *shape))
    assert out.shape == (2, 7)


def test_torchvision_by_name_with_class_count():
    net = models.create("resnet18", num_classes=5, input_shape=(3, 64, 64)).eval()
    assert models.is_known("torchvision:resnet18") and models.is_known("resnet18")
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_unknown_architecture_names_choices():
    assert not models.is_known("resnet9000")
    with pytest.raises(KeyError, match=r"unknown architecture 'resnet9000'; did you mean "
                                       r"'resnet50'\? .*mntd_cifar_cnn.*timm:<name>"):
        models.create("resnet9000", 10, (3, 32, 32))


def test_registry_lists_in_project_and_torchvision():
    names = models.available()
    assert "preact_resnet18" in names and "torchvision:resnet18" in names
    assert models.available("mntd_*") == ["mntd_cifar_cnn", "mntd_mnist_cnn"]


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        models.register("nin")(lambda k, s: None)
