"""Safe model loading: every format round-trips, pickles stay shut without the opt-in."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import threading

import pytest
import torch

from xray import models
from xray.io import storage
from xray.io.model_loading import (MAX_MODEL_BYTES, ModelLoadError, Normalized,
                                   PickleNotAllowedError, check_model_file, load_model,
                                   model_digest, save_model)
from xray.io.records import ModelRecord
from xray.reduce.formatting import first_line
from xray.scanning import _error_text, model_fingerprint
from xray.textclip import clip_text

ARCH, CLASSES, SHAPE = "mntd_mnist_cnn", 3, (1, 16, 16)


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(ARCH, CLASSES, SHAPE).eval()


def record_for(uri: str, fmt: str, **extra) -> ModelRecord:
    return ModelRecord(model_id="m", uri=str(uri), format=fmt, architecture=ARCH,
                       num_classes=CLASSES, input_shape=SHAPE, **extra)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "torchscript", "pickle"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, x, fmt):
    net = make_net()
    uri = str(tmp_path / f"model.{fmt}")
    digest = save_model(net, uri, fmt, allow_pickle=True)
    assert digest == hashlib.sha256(pathlib.Path(uri).read_bytes()).hexdigest()[:16]
    assert model_digest(uri) == digest
    loaded = load_model(record_for(uri, fmt, mean=(0.5,), std=(0.25,)), allow_pickle=True)
    assert isinstance(loaded, Normalized) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), net((x - 0.5) / 0.25))
        assert torch.equal(loaded.net(x), net(x))


def test_normalisation_per_channel():
    net = torch.nn.Identity()
    wrapped = Normalized(net, (0.5, 0.25, 0.0), (0.5, 0.5, 2.0))
    x = torch.ones(1, 3, 2, 2)
    assert wrapped(x)[0, :, 0, 0].tolist() == [1.0, 1.5, 0.5]
    assert list(wrapped.state_dict()) == []  # the wrapper adds no keys of its own


@pytest.mark.parametrize("wrap", ["module_prefix", "state_dict", "model_state_dict", "model"])
def test_common_state_dict_wrappings_load(tmp_path, x, wrap):
    net = make_net()
    state = net.state_dict()
    if wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = {wrap: {f"module.{k}": v for k, v in state.items()}, "epoch": 7,
               "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = load_model(record_for(tmp_path / "ckpt.pt", "state_dict"))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_unrecognised_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"weights": make_net().state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(ModelLoadError, match=r"checkpoint dict .*found a dict with keys "
                                             r"\['epoch', 'weights'\]"):
        load_model(record_for(tmp_path / "ckpt.pt", "state_dict"))


def test_mismatched_weights_list_missing_and_unexpected_keys(tmp_path):
    state = make_net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["classifier.3.bias"]
    save_model_state = io.BytesIO()
    torch.save(state, save_model_state)
    (tmp_path / "m.pt").write_bytes(save_model_state.getvalue())
    with pytest.raises(ModelLoadError) as info:
        load_model(record_for(tmp_path / "m.pt", "state_dict"))
    text = str(info.value)
    assert "missing: classifier.3.bias" in text and "unexpected: extra.weight" in text

    save_model(make_net(), str(tmp_path / "m.safetensors"), "safetensors")
    wrong = dataclasses.replace(record_for(tmp_path / "m.safetensors", "safetensors"),
                                num_classes=5)
    with pytest.raises(ModelLoadError, match=r"wrong shape .*classifier.3.weight \(3, 512\) vs "
                                             r"\(5, 512\)"):
        load_model(wrong)


class TouchOnLoad:
    """Unpickling this calls pathlib.Path.touch(marker): code execution from a model file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_malicious_pickle_runs_only_with_the_opt_in(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(TouchOnLoad(marker), tmp_path / "model.pt")
    record = record_for(tmp_path / "model.pt", "pickle")

    with pytest.raises(PickleNotAllowedError) as info:
        load_model(record)
    assert str(tmp_path / "model.pt") in str(info.value) and "--allow-pickle" in str(info.value)
    assert not marker.exists()
    # The same bytes labelled as a state dict go through weights_only and are refused too.
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(dataclasses.replace(record, format="state_dict"))
    assert not marker.exists()

    # With the opt-in the payload does run: the test above can tell the two apart.
    with pytest.raises(ModelLoadError, match="expected a pickled torch.nn.Module"):
        load_model(record, allow_pickle=True)
    assert marker.exists()


def test_pickle_refusal_reads_nothing(tmp_path):
    record = record_for(tmp_path / "not-there.pt", "pickle")
    with pytest.raises(PickleNotAllowedError):  # not FileNotFoundError: the file is never opened
        load_model(record)
    with pytest.raises(PickleNotAllowedError):
        save_model(make_net(), str(tmp_path / "out.pt"), "pickle")
    assert not (tmp_path / "out.pt").exists()


def test_unknown_format_and_corrupt_files(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model format 'onnx'"):
        load_model(record_for(tmp_path / "m.onnx", "onnx"))
    (tmp_path / "junk").write_bytes(b"not a model")
    for fmt in ("safetensors", "state_dict", "torchscript"):
        with pytest.raises(ModelLoadError, match=str(tmp_path / "junk")):
            load_model(record_for(tmp_path / "junk", fmt))


def test_save_unwraps_normalized_and_torchscript_trace(tmp_path, x):
    net = make_net()
    save_model(Normalized(net, (0.5,), (0.5,)), str(tmp_path / "m.safetensors"), "safetensors")
    save_model(net, str(tmp_path / "m.ts"), "torchscript", example_input=x[:1])
    a = load_model(record_for(tmp_path / "m.safetensors", "safetensors"))
    b = load_model(record_for(tmp_path / "m.ts", "torchscript"))
    with torch.no_grad():
        assert torch.equal(a(x), net(x)) and torch.equal(b(x), net(x))


def test_load_from_s3(s3_server, x):
    net = make_net(seed=3)
    base = f"s3://{s3_server.bucket}/test_model_loading"
    for fmt in ("safetensors", "torchscript"):
        uri = f"{base}/model.{fmt}"
        digest = save_model(net, uri, fmt)
        assert model_digest(uri) == digest == \
            hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]
        loaded = load_model(record_for(uri, fmt))
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))


# ---- hostile model files: devices, oversized files, long error texts ---------------------------

def _refused_everywhere(uri: str, reason: str, fmt: str = "safetensors") -> None:
    """`uri` is refused with `reason` by the check itself first (so a broken check fails here,
    before anything below reads a device), then by loading, digesting and fingerprinting."""
    with pytest.raises(ModelLoadError) as info:
        check_model_file(uri)
    assert str(info.value) == f"{uri}: {reason}"
    for read in (lambda: load_model(record_for(uri, fmt)), lambda: model_digest(uri),
                 lambda: model_fingerprint(uri)):
        with pytest.raises(ModelLoadError) as info:
            read()
        assert str(info.value) == f"{uri}: {reason}"


def test_devices_fifos_and_directories_are_refused_unread(tmp_path):
    _refused_everywhere("/dev/zero", "not a regular file (character device); refused")
    _refused_everywhere("file:///dev/zero", "not a regular file (character device); refused",
                        fmt="state_dict")
    (tmp_path / "model.pt").symlink_to("/dev/zero")  # a link in the corpus, followed
    _refused_everywhere(str(tmp_path / "model.pt"), "not a regular file (character device); "
                                                    "refused")
    _refused_everywhere(str(tmp_path), "not a regular file (directory); refused")
    storage.write_text("memory://test_model_loading_dir/inside.txt", "x")
    _refused_everywhere("memory://test_model_loading_dir",
                        "not a regular file (directory); refused")

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def load() -> None:  # opening a FIFO with no writer blocks: in a thread, with a deadline
        try:
            _refused_everywhere(str(fifo), "not a regular file (FIFO); refused")
        except BaseException as e:  # noqa: B036 (reported below, on the test's thread)
            errors.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "blocked opening a FIFO"
    assert not errors, errors


def test_size_cap_default_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("XRAY_MAX_MODEL_BYTES", raising=False)
    assert MAX_MODEL_BYTES == 4 * 1024**3
    big = tmp_path / "x.pt"
    with open(big, "wb") as f:  # sparse: 5 GiB that take no disk and are never read
        f.truncate(5 * 1024**3)
    _refused_everywhere(str(big), "5.0 GiB is over the 4.0 GiB model size cap "
                                  "(XRAY_MAX_MODEL_BYTES); refused", fmt="state_dict")

    uri = str(tmp_path / "m.safetensors")
    save_model(make_net(), uri, "safetensors")
    size = os.path.getsize(uri)
    copy = "memory://test_model_loading_cap/m.safetensors"  # fs.info rather than os.stat
    storage.atomic_write_bytes(copy, pathlib.Path(uri).read_bytes())
    monkeypatch.setenv("XRAY_MAX_MODEL_BYTES", str(size - 1))
    for target in (uri, copy):
        _refused_everywhere(target, f"{size / 1024:.1f} KiB is over the {(size - 1) / 1024:.1f} "
                                    "KiB model size cap (XRAY_MAX_MODEL_BYTES); refused")
    monkeypatch.setenv("XRAY_MAX_MODEL_BYTES", str(size))
    for target in (uri, copy):
        assert check_model_file(target) == size
        assert model_digest(target) == model_digest(uri)
        load_model(record_for(target, "safetensors"))
    monkeypatch.setenv("XRAY_MAX_MODEL_BYTES", "4GB")
    with pytest.raises(ValueError, match="XRAY_MAX_MODEL_BYTES='4GB': expected a positive whole"):
        load_model(record_for(uri, "safetensors"))


def test_empty_files_and_proc_files_are_refused(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused_everywhere(str(tmp_path / "empty.pt"), "an empty file (0 bytes); refused")
    # /proc files are regular files that say 0 bytes, whatever they hold
    _refused_everywhere("/proc/self/environ", "an empty file (0 bytes); refused")


def test_wrong_shape_error_keeps_its_whole_text(tmp_path):
    folder = tmp_path / ("round-" + "a-long-corpus-folder-name-" * 6) / "id-00000042"
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save(make_net().state_dict(), buf)  # 3 classes, read as 5: a real wrong shape
    (folder / "model.pt").write_bytes(buf.getvalue())
    wrong = dataclasses.replace(record_for(folder / "model.pt", "state_dict"), num_classes=5)
    with pytest.raises(ModelLoadError) as info:
        load_model(wrong)
    message = str(info.value)
    assert len(message) > 300  # longer than the old cuts ...
    assert message.endswith("classifier.3.bias (3,) vs (5,), classifier.3.weight (3, 512) vs "
                            "(5, 512)")
    # ... and whole in the error row and in the report's one-line summary of it.
    assert first_line(_error_text(info.value)) == f"ModelLoadError: {message}"


def test_refused_state_dict_names_the_reason_whole(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError) as info:
        load_model(record_for(tmp_path / "junk.pt", "state_dict"))
    assert "refused it (Unsupported operand 110). If it is a whole-module pickle" in str(info.value)

    torch.save(TouchOnLoad(tmp_path / "pwned"), tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError) as info:
        load_model(record_for(tmp_path / "evil.pt", "state_dict"))
    assert ("refused it (Unsupported global: GLOBAL getattr was not an allowed global by "
            "default.). If it is") in str(info.value)
    assert "\x1b" not in str(info.value) and not (tmp_path / "pwned").exists()


def test_clip_text_cuts_at_a_sentence_or_clause_end():
    assert clip_text("short. text") == "short. text"
    sentences = "A first sentence that says what failed. " + "Then detail, and more. " * 60
    assert clip_text(sentences) == sentences  # under the generous default cap: whole
    clipped = clip_text(sentences, 300)
    assert len(clipped) <= 300 and clipped.endswith("and more. [...]")
    assert clipped.startswith("A first sentence that says what failed. ")
    clauses = "x.pt: weights do not fit nin; " + "; ".join(f"layer{i} (3,) vs (5,)"
                                                            for i in range(100))
    assert clip_text(clauses, 200).endswith("vs (5,); [...]")
    assert clip_text("y" * 500, 100) == "y" * 94 + " [...]"
    assert first_line("E: " + sentences + "\ntraceback") == "E: " + sentences
    assert first_line("E: " + sentences * 2).endswith("and more. [...]")


def test_fingerprint_follows_the_weights_not_the_inode(tmp_path):
    """A model file's fingerprint (what a re-scan compares) is its size and mtime locally: a
    chmod, a rename or a copy that keeps the mtime (cp -p) leave it alone (they change only the
    ctime, which once counted and made a moved round scan again), a rewrite changes it. On
    fsspec's memory store, which has no mtime, the creation time still counts."""
    import shutil
    import time

    first = tmp_path / "a" / "model.pt"
    first.parent.mkdir()
    first.write_bytes(b"weights-1")
    before = model_fingerprint(str(first))
    time.sleep(0.01)
    os.chmod(first, 0o600)
    assert model_fingerprint(str(first)) == before
    copy = tmp_path / "b" / "model.pt"
    shutil.copytree(first.parent, copy.parent)  # copy2: mtimes kept, as cp -p
    assert model_fingerprint(str(copy)) == before
    moved = tmp_path / "c"
    copy.parent.rename(moved)
    assert model_fingerprint(str(moved / "model.pt")) == before
    first.write_bytes(b"weights-2")  # same size, new content
    os.utime(first, (time.time() + 5, time.time() + 5))
    assert model_fingerprint(str(first)) != before

    storage.write_text("memory://test_fingerprint/model.pt", "w")
    in_memory = model_fingerprint("memory://test_fingerprint/model.pt")
    time.sleep(0.01)
    storage.write_text("memory://test_fingerprint/model.pt", "v")
    assert model_fingerprint("memory://test_fingerprint/model.pt") != in_memory
