"""Example PNG folders: write / load round trips under each preprocessing variant."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xray.io.examples import check_preprocessing, list_examples, load_examples, write_examples
from xray.io.records import ModelRecord


def pixels(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images on the 1/255 grid, so a PNG round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).to(torch.float32) / 255.0


def record(uri, shape=(3, 8, 8), **preprocessing) -> ModelRecord:
    return ModelRecord("m", "unused.pt", "state_dict", "nin", 12, shape, examples_uri=str(uri),
                       preprocessing=preprocessing)


def in_file_order(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What load_examples returns: by class, then by order of writing within the class."""
    order = torch.as_tensor(np.argsort(y.numpy(), kind="stable"))
    return x[order], y[order]


Y = torch.tensor([2, 0, 10, 2, 0, 2, 10, 1] + [2] * 8)  # class 10 sorts after 2; 11 of class 2


def test_round_trip_rgb_unit(tmp_path):
    x = pixels(len(Y), 3, 8, 8)
    written = write_examples(x, Y, str(tmp_path))
    assert len(written) == len(Y) and (tmp_path / "class_2_example_10.png").exists()
    got_x, got_y = load_examples(record(tmp_path))
    want_x, want_y = in_file_order(x, Y)
    assert got_x.dtype == torch.float32 and got_y.dtype == torch.int64
    assert torch.equal(got_y, want_y) and torch.equal(got_x, want_x)


def test_round_trip_grayscale_and_numpy_uint8_input(tmp_path):
    x = pixels(5, 1, 6, 6)
    y = np.array([0, 1, 0, 1, 1])
    write_examples((x * 255).round().to(torch.uint8).numpy(), y, str(tmp_path))
    got_x, got_y = load_examples(record(tmp_path, shape=(1, 6, 6)))
    want_x, want_y = in_file_order(x, torch.as_tensor(y))
    assert got_x.shape == (5, 1, 6, 6)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)


@pytest.mark.parametrize("variant", ["bgr", "crop", "minmax", "r1", "r2-4"])
def test_preprocessing_variants(tmp_path, variant):
    x = pixels(6, 3, 10, 10, seed=5) * 0.5 + 0.25  # not spanning 0..1, so min-max matters
    x = (x * 255).round() / 255
    y = torch.tensor([1, 0, 1, 0, 1, 0])
    write_examples(x, y, str(tmp_path))
    want, _ = in_file_order(x, y)

    def minmax(t):
        flat = t.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        return (t - lo.view(-1, 1, 1, 1)) / (hi - lo).view(-1, 1, 1, 1)

    shape = (3, 10, 10)
    if variant == "bgr":
        prep, want = {"channel_order": "BGR"}, want.flip(1)
    elif variant == "crop":
        prep, want, shape = {"center_crop": 6}, want[:, :, 2:8, 2:8], (3, 6, 6)
    elif variant == "minmax":
        prep, want = {"scale": "minmax"}, minmax(want)
    elif variant == "r1":  # TrojAI round 1: BGR, per-image min-max, no crop
        prep, want = {"channel_order": "BGR", "scale": "minmax"}, minmax(want.flip(1))
    else:  # TrojAI rounds 2-4: RGB, centre crop, x / 255
        prep = {"channel_order": "RGB", "center_crop": 4, "scale": "unit"}
        want, shape = want[:, :, 3:7, 3:7], (3, 4, 4)
    got, _ = load_examples(record(tmp_path, shape=shape, **prep))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


def test_poisoned_files_are_skipped_and_max_per_class(tmp_path):
    x = pixels(6, 3, 8, 8)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    write_examples(x, y, str(tmp_path))
    write_examples(pixels(2, 3, 8, 8, seed=9), torch.tensor([0, 1]), str(tmp_path),
                   prefix="class_{c}_trigger_0_example_{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [n for _, _, n in list_examples(str(tmp_path))] == [
        f"class_{c}_example_{i}.png" for c in (0, 1) for i in range(3)]
    got_x, got_y = load_examples(record(tmp_path), max_per_class=2)
    assert got_y.tolist() == [0, 0, 1, 1]
    assert torch.equal(got_x, x[[0, 1, 3, 4]])


def test_clear_errors(tmp_path):
    write_examples(pixels(2, 3, 8, 8), torch.tensor([0, 1]), str(tmp_path))
    with pytest.raises(ValueError, match=r"expects input_shape \(3, 32, 32\)"):
        load_examples(record(tmp_path, shape=(3, 32, 32)))
    with pytest.raises(ValueError, match="no clean example images"):
        load_examples(record(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no examples_uri"):
        load_examples(ModelRecord("m", "u", "state_dict", "nin", 2, (3, 8, 8)))
    with pytest.raises(ValueError, match="unknown preprocessing key"):
        check_preprocessing({"resize": 32})
    with pytest.raises(ValueError, match="center_crop"):
        check_preprocessing({"center_crop": "224"})
    with pytest.raises(ValueError, match="C = 1 or 3"):
        write_examples(pixels(2, 2, 8, 8), torch.tensor([0, 1]), str(tmp_path))


def test_examples_on_s3(s3_server):
    uri = f"s3://{s3_server.bucket}/test_examples/clean_example_data"
    x = pixels(4, 3, 8, 8)
    y = torch.tensor([1, 0, 1, 0])
    write_examples(x, y, uri)
    got_x, got_y = load_examples(record(uri))
    want_x, want_y = in_file_order(x, y)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
