"""Batched inference: in-memory inputs, folders, datasets, prefetching, options."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from histohub._features import extract_features, prefetch
from histohub.hub._transforms import get_transform, normalize_batch


class Tiny(nn.Module):
    """A small deterministic encoder: (B, 3, 224, 224) -> (B, 6). Dropout checks eval mode."""

    def __init__(self, *, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, kernel_size=16, stride=16)
        self.drop = nn.Dropout(0.5)
        self.calls = 0
        self.fail_at = fail_at  # simulate a crash on this call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        return self.drop(self.conv(x).mean(dim=(2, 3)))


def reference(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch)


# --------------------------------------------------------------------------- in memory

def test_tensor_inputs_uint8_and_float():
    model = Tiny()
    images = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    result = extract_features(model, images, batch_size=2, progress=False)
    expected = reference(model, normalize_batch(images, "resnet18-ssl"))
    torch.testing.assert_close(result.features, expected, rtol=1e-5, atol=1e-5)
    assert result.names is None and not model.training
    floats = normalize_batch(images, "resnet18-ssl")
    again = extract_features(model, floats, batch_size=3, progress=False)
    torch.testing.assert_close(again.features, expected, rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_is_close_to_float32():
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    full = extract_features(Tiny(), images, progress=False).features
    half = extract_features(Tiny(), images, amp=True, progress=False).features
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.02, atol=0.02 * full.abs().max().item())
    with pytest.raises(ValueError, match="amp"):
        extract_features(Tiny(), images, amp="int8", progress=False)


def test_normalize_batch_is_the_transforms_normalisation_in_either_layout():
    """Pixels as read (``(B, H, W, 3)`` in memory, seen channels_last) are normalised as
    whole rows; every layout gives the same values as torchvision's ``Normalize``."""
    from torchvision.transforms import v2

    from histohub.hub._schema import Preprocessing

    pre = Preprocessing(input_size=56, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8)
    as_read = pixels.permute(0, 3, 1, 2)  # channels_last view, as the slide reader hands it
    expected = v2.Normalize(pre.mean, pre.std)(as_read.contiguous().float() / 255)
    rows = normalize_batch(as_read, pre)
    plain = normalize_batch(as_read.contiguous(), pre)
    assert rows.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    assert torch.equal(rows, plain)
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)
    sliced = normalize_batch(as_read[:, :, :, 8:24], pre)  # not whole rows: done as plain
    assert torch.equal(sliced, plain[:, :, :, 8:24])
    assert normalize_batch(as_read[:0], pre).shape == (0, 3, 40, 56)


def test_pil_images_in_order_and_dataset_items():
    model = Tiny()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (180, 200, 3), dtype=np.uint8))
              for _ in range(7)]
    transform = get_transform("resnet18-ssl")
    expected = reference(model, torch.stack([transform(im) for im in images]))
    result = extract_features(model, images, batch_size=3, progress=False)
    torch.testing.assert_close(result.features, expected, rtol=1e-5, atol=1e-5)

    class Pairs(torch.utils.data.Dataset):  # (image, label) items, as torchvision datasets
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], i % 2

    from_dataset = extract_features(model, Pairs(), batch_size=4, progress=False)
    torch.testing.assert_close(from_dataset.features, expected, rtol=1e-5, atol=1e-5)


def test_folder_any_depth_sorted_with_names_and_bad_files(tmp_path):
    model = Tiny()
    rng = np.random.default_rng(1)
    files = ["b/2.png", "a/x/1.jpg", "a/0.tif", "c.jpeg", "a/x/z.TIFF"]
    for name in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    result = extract_features(model, tmp_path, batch_size=2, progress=False)
    expected_names = sorted(files)  # sorted by relative path
    assert result.names == expected_names
    assert result.failed == ["a/broken.png"]
    transform = get_transform("resnet18-ssl")
    batch = torch.stack([transform(Image.open(tmp_path / n).convert("RGB"))
                         for n in expected_names])
    torch.testing.assert_close(result.features, reference(model, batch), rtol=1e-5, atol=1e-5)


def test_real_tiles_folder(shared_data):
    """Kather 2016 tiles (150 px TIFFs) of three tissue classes, as PIL images:
    the features are the model's on the manifest's preprocessing, and tell the tiles apart."""
    folder = shared_data / "kather2016-tiles"
    subset = [sorted((folder / name).glob("*.tif"))[0]
              for name in ("01_tumor", "02_stroma", "07_adipose")]
    model = Tiny()
    result = extract_features(model, [Image.open(p).convert("RGB") for p in subset],
                              progress=False)
    transform = get_transform("resnet18-ssl")
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in subset])
    assert batch.shape == (3, 3, 224, 224)  # resized from 150 px, as the manifest says
    torch.testing.assert_close(result.features, reference(model, batch), rtol=1e-5, atol=1e-5)
    assert torch.pdist(result.features).min() > 0.1  # 0.38 (tumour vs stroma) measured


def test_nonfinite_rows_are_reported(caplog):
    class Poisoned(Tiny):
        def forward(self, x):
            out = super().forward(x)
            out[x.mean(dim=(1, 2, 3)) > 0] = float("nan")
            return out

    images = torch.zeros((4, 3, 224, 224), dtype=torch.uint8)
    images[2] = 255
    result = extract_features(Poisoned(), images, progress=False)
    assert result.nonfinite == [2]
    assert "NaN or inf" in caplog.text


def test_prefetch_order_errors_and_early_stop():
    assert list(prefetch(iter(range(10)))) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("reader broke")

    with pytest.raises(RuntimeError, match="reader broke"):
        list(prefetch(failing()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    time.sleep(0.3)
    assert len(produced) <= 3 + 2 + 2  # the producer stopped soon after the consumer


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size=0"), ({"num_workers": -2}, "num_workers=-2"),
    ({"amp": "int8"}, "amp='int8'")])
def test_extract_features_checks_options_first(options, message):
    from histohub.errors import OptionError

    with pytest.raises(OptionError, match=message):
        extract_features("no-such-model", torch.zeros(2, 3, 224, 224), progress=False,
                         **options)
