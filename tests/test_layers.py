"""split_model: g(h(x)) == model(x) for every registered family, h ends at the named layer."""
import pytest
import torch

from xray import models
from xray.io.model_loading import Normalized
from xray.models.layers import POSITIONS, split_model

# (architecture, input shape, the layer "second_last" must name per docs/algorithms/exray.md)
CASES = [
    ("mntd_mnist_cnn", (1, 24, 24), "features.2"),
    ("mntd_cifar_cnn", (3, 24, 24), "features.6"),
    ("nin", (3, 24, 24), "features.2"),
    ("preact_resnet18", (3, 16, 16), "layer3"),
    ("resnet18", (3, 32, 32), "layer3"),
    ("vgg11_bn", (3, 32, 32), "features.23"),
    ("densenet121", (3, 32, 32), "features.transition3.norm"),
    ("inception_v3", (3, 75, 75), "Mixed_7b"),
    ("googlenet", (3, 32, 32), "inception5a"),
    ("mobilenet_v2", (3, 32, 32), "features.16"),
    ("shufflenet_v2_x0_5", (3, 32, 32), "stage4.2"),
    ("squeezenet1_1", (3, 64, 64), "features.11"),
]


def _create(arch, shape):
    if not arch.startswith("vgg"):
        return models.create(arch, num_classes=5, input_shape=shape)
    # VGG: the same plan with a one-layer head instead of 120M weights to initialise.
    with torch.device("meta"):
        net = models.create(arch, num_classes=5, input_shape=shape)
        net.classifier = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(25088, 5))
    net = net.to_empty(device="cpu")
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return net


def _forward_with_hooks(model, names, x):
    """model(x) and the output of each named module, from one forward pass."""
    seen, handles = {}, []
    for name in set(names):
        def hook(mod, inp, out, name=name):
            assert name not in seen, f"{name} ran twice"
            seen[name] = out.clone()  # later in-place ReLUs (VGG, DenseNet) change `out`
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


@pytest.mark.parametrize("arch,shape,second_last", CASES, ids=[c[0] for c in CASES])
def test_split_composes_to_the_model(arch, shape, second_last):
    torch.manual_seed(0)
    net = _create(arch, shape)
    mean, std = [0.4] * shape[0], [0.25] * shape[0]
    model = Normalized(net, mean, std).eval()
    x = torch.rand(2, *shape)
    splits = {pos: split_model(model, pos) for pos in POSITIONS}
    with torch.no_grad():
        want, layer_out = _forward_with_hooks(model, [s[2] for s in splits.values()], x)
        for pos, (h, g, name) in splits.items():
            feats = h(x)
            torch.testing.assert_close(g(feats), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(feats, layer_out[name])
            assert feats.dim() == 4, f"{arch} {pos}: {name} is not a feature map"
    names = {pos: s[2] for pos, s in splits.items()}
    assert names["second_last"] == "net." + second_last
    assert split_model(model)[2] == names["second_last"]
    assert names["last"] != names["second_last"] or arch == "mntd_mnist_cnn"


# Large nets: the layer plan only, built on the meta device (no memory, no init cost).
NAMES = [
    ("preact_resnet34", ["layer2", "layer3", "layer4"]),
    ("resnet50", ["layer2", "layer3", "layer4"]),
    ("wide_resnet50_2", ["layer2", "layer3", "layer4"]),
    ("vgg16_bn", ["features.21", "features.38", "features.41"]),
    ("densenet161", ["features.transition2.norm", "features.transition3.norm", "features.norm5"]),
    ("shufflenet_v2_x1_0", ["stage3.3", "stage4.2", "stage4.3"]),
    ("squeezenet1_0", ["features.7", "features.10", "features.12"]),
    ("efficientnet_b0", ["features.4", "features.7", "features.8"]),  # fallback plan (inferred)
]


@pytest.mark.parametrize("arch,want", NAMES, ids=[c[0] for c in NAMES])
def test_layer_plan_of_large_nets(arch, want):
    with torch.device("meta"):
        net = models.create(arch, num_classes=5, input_shape=(3, 224, 224))
    assert [split_model(net, pos)[2] for pos in POSITIONS] == want


def test_bare_network_and_gradients_flow():
    net = models.create("mntd_mnist_cnn", num_classes=5, input_shape=(1, 24, 24)).eval()
    h, g, name = split_model(net, "second last")
    assert name == "features.2"
    x = torch.rand(3, 1, 24, 24, requires_grad=True)
    feats = h(x)
    m = torch.full((1, feats.shape[1], 1, 1), 0.5, requires_grad=True)
    g(m * feats + (1 - m) * feats.flip(0)).sum().backward()
    assert m.grad is not None and x.grad is not None
    torch.testing.assert_close(g(h(x)), net(x))


def test_g_does_not_change_its_input():
    # VGG's features continue with ReLU(inplace=True) after the cut BatchNorm.
    net = _create("vgg11_bn", (3, 32, 32)).eval()
    h, g, _ = split_model(net)
    with torch.no_grad():
        feats = h(torch.rand(2, 3, 32, 32))
        before = feats.clone()
        g(feats)
    assert torch.equal(feats, before) and (before < 0).any()


def test_unknown_position_and_architecture():
    net = models.create("resnet18", num_classes=3, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="unknown layer position 'top'"):
        split_model(net, "top")
    with pytest.raises(NotImplementedError, match="no layer plan for Linear"):
        split_model(torch.nn.Linear(3, 3))


def test_one_normalisation_for_the_wrapper_the_split_and_scan_data():
    """Normalized, the split's <normalize> head and ScanData.normalize are one step (x - m) / s:
    the same numbers, one value broadcasting over channels, and denormalize inverting it."""
    from xray.detectors.base import ScanData

    torch.manual_seed(0)
    x = torch.rand(4, 3, 24, 24)
    for mean, std in [((0.5, 0.25, 0.0), (0.5, 0.5, 2.0)), ((0.3,), (0.7,))]:
        model = Normalized(models.create("mntd_cifar_cnn", 5, (3, 24, 24)), mean, std).eval()
        h, _, _ = split_model(model)
        data = ScanData(x=x, y=torch.zeros(4, dtype=torch.long), num_classes=5, mean=mean,
                        std=std)
        z = data.normalize(x)
        assert torch.equal(h[0](x), z)
        assert torch.equal(model.net(z), model(x))
        assert torch.allclose(data.denormalize(z), x, atol=1e-6)
