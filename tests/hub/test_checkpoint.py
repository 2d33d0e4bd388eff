"""Checkpoints are read as data, never as code, and mapped onto the encoder strictly.

Checkpoints are built by tests/checkpoints.py in the upstream layouts (random weights):
the plain-PyTorch release (``state_dict`` with ``model.resnet.`` keys and the SimCLR head
``fc.1``/``fc.3``), the Lightning release (plus optimizer state and hyper-parameter
objects, saved while a fake ``pytorch_lightning`` module exists and loaded after it is
gone), legacy (pre-zip) files, and safetensors.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision
from checkpoints import (fake_lightning, lightning_checkpoint, reference_encoder, shapes,
                         upstream_state_dict)
from safetensors.torch import save_file

import histohub
from histohub.hub._checkpoint import DEFAULT_KEY_MAP, map_state_dict, read_checkpoint
from histohub.hub._registry import get_entry
from histohub.hub._schema import KeyMap
from histohub.errors import (CheckpointError, HistohubError, KeyMappingError,
                             UnsafeCheckpointError)

UPSTREAM_KEY_MAP = get_entry("resnet18-ssl").weights[0].key_map


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def native_ckpt(tmp_path_factory, backbone_state) -> Path:
    """The plain-PyTorch release's layout (``pytorchnative_tenpercent_resnet18.ckpt``)."""
    path = tmp_path_factory.mktemp("ckpt") / "pytorchnative_tenpercent_resnet18.ckpt"
    torch.save({"state_dict": upstream_state_dict(backbone_state)}, path)
    return path


@pytest.fixture(scope="session")
def batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 96, 96)


def features(model, batch):
    with torch.no_grad():
        return model(batch)


# --------------------------------------------------------------------------- never run code


class _Payload:
    """Pickles as a call: ``func(*args)`` runs when an ordinary unpickler reads it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


PAYLOADS = {
    "os.system": lambda marker: _Payload(os.system, f"touch '{marker}'"),
    "builtins.exec": lambda marker: _Payload(
        builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')"),
}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload, zipped):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(PAYLOADS[payload](control)))
    assert control.exists(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)},
                "hyper_parameters": PAYLOADS[payload](marker)}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeCheckpointError, match=r"Refused.*(system|exec).*Nothing"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        histohub.load_pretrained(path, arch="resnet18")
    assert not marker.exists()


def test_unsafe_checkpoint_error_is_a_checkpoint_error():
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    assert issubclass(CheckpointError, ValueError)


# --------------------------------------------------------------------------- layouts


def test_native_release_layout_loads_exactly(native_ckpt, backbone_state, batch):
    model = histohub.load_pretrained(native_ckpt)
    info = model.histohub_info
    assert (info.arch, info.feature_dim) == ("resnet18", 512)
    assert info.sha256 == hashlib.sha256(native_ckpt.read_bytes()).hexdigest()
    assert not model.training
    assert torch.equal(features(model, batch), features(reference_encoder(backbone_state), batch))




@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_lightning_layout_loads_without_pytorch_lightning(tmp_path, backbone_state, batch,
                                                          zipped):
    path = tmp_path / "tenpercent_resnet18.ckpt"
    with fake_lightning():
        torch.save(lightning_checkpoint(backbone_state), path,
                   _use_new_zipfile_serialization=zipped)

    checkpoint = read_checkpoint(path, format="lightning")
    assert checkpoint["hyper_parameters"]["batch_size"] == 512
    assert checkpoint["hyper_parameters"]["args"].epochs == 1000
    assert checkpoint["hparams"].lr == 0.3
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["momentum"] == 0.9
    model = histohub.load_pretrained(path)
    assert torch.equal(features(model, batch), features(reference_encoder(backbone_state), batch))


def test_lightning_callback_states_keyed_by_class(tmp_path, backbone_state):
    path = tmp_path / "tenpercent_resnet18.ckpt"
    state = {k: v for k, v in backbone_state.items()}
    checkpoint = lightning_checkpoint(state, callbacks=True)
    checkpoint["hyper_parameters"] = dict(checkpoint["hyper_parameters"])  # isolate the cause
    with fake_lightning():
        torch.save(checkpoint, path)
    loaded = read_checkpoint(path)
    (callback_state,) = loaded["callbacks"].values()
    assert callback_state["best_model_path"] == "epoch=999.ckpt"


def test_namespace_hyper_parameters_and_optimizer_state_load(tmp_path, backbone_state):
    """Lightning before AttributeDict (0.7, the epoch-9 release's era), legacy format."""
    checkpoint = lightning_checkpoint(backbone_state)
    checkpoint["hyper_parameters"] = dict(checkpoint["hyper_parameters"])
    path = tmp_path / "_ckpt_epoch_9.ckpt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    loaded = read_checkpoint(path)
    assert loaded["hparams"] == argparse.Namespace(lr=0.3, batch_size=512)
    assert loaded["hyper_parameters"]["args"].lars is True
    momentum = loaded["optimizer_states"][0]["state"][0]["momentum_buffer"]
    assert isinstance(momentum, torch.Tensor)
    state = map_state_dict(loaded, UPSTREAM_KEY_MAP, shapes("resnet18"))
    assert all(torch.equal(state[k], v) for k, v in backbone_state.items())


def test_safetensors_round_trip(tmp_path, backbone_state, batch):
    path = tmp_path / "resnet18.safetensors"
    save_file(backbone_state, path)
    loaded = read_checkpoint(path)
    assert loaded.keys() == backbone_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in backbone_state.items())
    model = histohub.load_pretrained(path)
    assert model.histohub_info.arch == "resnet18"
    assert torch.equal(features(model, batch), features(reference_encoder(backbone_state), batch))


@pytest.mark.parametrize("prefix", ["", "module.", "model.resnet.", "backbone.",
                                    "module.backbone.", "encoder."])
def test_default_key_map_handles_common_layouts(backbone_state, prefix):
    checkpoint = {"state_dict": {prefix + k: v for k, v in backbone_state.items()}}
    checkpoint["state_dict"][prefix + "fc.weight"] = torch.zeros(10, 512)
    state = map_state_dict(checkpoint, DEFAULT_KEY_MAP, shapes("resnet18"))
    assert state.keys() == backbone_state.keys()


def test_missing_num_batches_tracked_is_the_one_tolerance(backbone_state):
    old = {k: v for k, v in backbone_state.items() if not k.endswith("num_batches_tracked")}
    state = map_state_dict(old, KeyMap(), shapes("resnet18"))
    assert state.keys() == backbone_state.keys()
    assert int(state["bn1.num_batches_tracked"]) == 0


# --------------------------------------------------------------------------- strict mapping


def test_missing_keys_are_named(backbone_state):
    partial = {k: v for k, v in backbone_state.items() if not k.startswith("layer4.")}
    with pytest.raises(KeyMappingError, match=r"missing \(25 of 120\): layer4\.0\.bn1\.bias"):
        map_state_dict(partial, KeyMap(), shapes("resnet18"))


def test_half_a_checkpoint_is_not_loaded_silently(native_ckpt):
    """The upstream README's loader keeps whatever matches; here a partial file fails."""
    checkpoint = read_checkpoint(native_ckpt)
    keys = sorted(checkpoint["state_dict"])
    checkpoint["state_dict"] = {k: checkpoint["state_dict"][k] for k in keys[::2]}
    with pytest.raises(KeyMappingError, match="nothing was loaded"):
        map_state_dict(checkpoint, UPSTREAM_KEY_MAP, shapes("resnet18"))


def test_unexpected_keys_are_named(backbone_state):
    extra = {**backbone_state, "projector.0.weight": torch.zeros(2, 2)}
    with pytest.raises(KeyMappingError, match=r"unexpected \(1\): projector\.0\.weight"):
        map_state_dict(extra, DEFAULT_KEY_MAP, shapes("resnet18"))


def test_projection_head_is_unexpected_unless_the_key_map_drops_it(native_ckpt):
    checkpoint = read_checkpoint(native_ckpt)
    no_drop = KeyMap(state_dict_key="state_dict", strip_prefixes=("model.resnet.",))
    with pytest.raises(KeyMappingError, match=r"unexpected \(4\): fc\.1\.bias, fc\.1\.weight"):
        map_state_dict(checkpoint, no_drop, shapes("resnet18"))
    assert len(map_state_dict(checkpoint, UPSTREAM_KEY_MAP, shapes("resnet18"))) == 120


def test_wrong_shapes_are_named(backbone_state):
    wrong = {**backbone_state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    with pytest.raises(KeyMappingError,
                       match=r"wrong shape \(1\): conv1\.weight: checkpoint \(64, 3, 3, 3\) "
                             r"vs model \(64, 3, 7, 7\)"):
        map_state_dict(wrong, KeyMap(), shapes("resnet18"))


def test_resnet50_weights_into_resnet18_fail_naming_keys():
    with torch.device("meta"):
        resnet50 = torchvision.models.resnet50()
    checkpoint = {k: v for k, v in resnet50.state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(KeyMappingError) as caught:
        map_state_dict(checkpoint, KeyMap(), shapes("resnet18"))
    message = str(caught.value)
    assert "unexpected" in message and "layer1.0.bn3.bias" in message
    assert "wrong shape" in message and "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1)" \
        in message


def test_two_keys_onto_one_name_are_refused(backbone_state):
    doubled = {**{f"module.{k}": v for k, v in backbone_state.items()}, **backbone_state}
    with pytest.raises(KeyMappingError, match=r"Two checkpoint keys map onto"):
        map_state_dict(doubled, DEFAULT_KEY_MAP, shapes("resnet18"))


def test_non_tensor_values_are_named(backbone_state):
    odd = {**backbone_state, "conv1.weight": [1.0, 2.0]}
    with pytest.raises(KeyMappingError, match=r"not tensors \(1\): conv1\.weight"):
        map_state_dict(odd, KeyMap(), shapes("resnet18"))


def test_load_pretrained_infers_resnet18(native_ckpt):
    assert histohub.load_pretrained(native_ckpt).histohub_info.arch == "resnet18"


@pytest.mark.parametrize("arch, key", [("resnet50", "layer1.0.conv3.weight"),
                                       ("resnet34", "layer1.2.bn1.bias")])
def test_load_pretrained_with_the_wrong_arch_fails_clearly(native_ckpt, arch, key):
    with pytest.raises(KeyMappingError, match=rf"(?s)missing.*{key}.*Check arch="):
        histohub.load_pretrained(native_ckpt, arch=arch)


def test_checkpoint_fitting_no_architecture(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(KeyMappingError, match="fits none of"):
        histohub.load_pretrained(path)


# --------------------------------------------------------------------------- corrupt files


def _small_checkpoint(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    state = torch.nn.Conv2d(3, 4, 3).state_dict()
    path = folder / f"small.{kind}"
    if kind == "safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=0.1)}, path,
                   _use_new_zipfile_serialization=kind == "zip")
    return path


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy"])
def test_every_truncation_is_a_checkpoint_error(tmp_path, kind):
    path = _small_checkpoint(kind, tmp_path)
    data = path.read_bytes()
    read_checkpoint(path)  # the whole file is fine
    cut = tmp_path / "cut"
    escaped = {}
    # Every length in the headers and the tail, a sample in between (about 250 reads).
    n = len(data)
    lengths = sorted({*range(min(n, 96)), *range(96, n, max(1, n // 100)),
                      *range(max(0, n - 48), n)})
    for length in lengths:
        cut.write_bytes(data[:length])
        try:
            read_checkpoint(cut)
        except CheckpointError:
            continue
        except Exception as error:  # noqa: BLE001 - collected and reported below
            escaped.setdefault(type(error).__name__, length)
        else:
            escaped.setdefault("loaded", length)
    assert not escaped, f"truncations not reported as CheckpointError: {escaped}"


@pytest.mark.parametrize("content", [b"", b"<!DOCTYPE html><html>Not Found</html>",
                                     b"version https://git-lfs.github.com/spec/v1\n"])
def test_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated|not a"):
        read_checkpoint(path)


def test_safetensors_whose_header_length_looks_like_a_pickle(tmp_path):
    """The 8-byte header length is little-endian: 128 + 256k bytes starts with 0x80, the
    first byte of a pickle. The file must still be read as safetensors, whatever its name."""
    for length in range(1, 300):
        state = {"x" * length: torch.arange(3.0)}
        path = tmp_path / "weights.bin"
        save_file(state, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(read_checkpoint(path)["x" * length], torch.arange(3.0))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.ckpt")


@pytest.mark.parametrize("where", ["absent.ckpt", "."], ids=["missing", "folder"])
def test_missing_file_or_folder_is_a_histohub_error(tmp_path, where):
    """Caught by the CLI's handler (a one-line message), and still a FileNotFoundError."""
    with pytest.raises(HistohubError, match="does not exist" if where != "." else "folder"
                       ) as caught:
        read_checkpoint(tmp_path / where)
    assert isinstance(caught.value, FileNotFoundError)


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "locked.pt"
    torch.save({"x": torch.zeros(1)}, path)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(CheckpointError, match="locked.pt"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.int64, torch.uint8])
@pytest.mark.parametrize("key", ["layer1.0.conv1.weight", "bn1.running_var"])
def test_weights_that_are_not_floating_point_are_refused_at_load(backbone_state, dtype, key):
    """Before, bool or integer weights failed inside load_state_dict and complex ones only
    at the first forward pass."""
    state = dict(backbone_state, **{key: backbone_state[key].to(dtype)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}.*{dtype}"):
        map_state_dict(state, KeyMap(), shapes("resnet18"))


def test_refused_dtype_through_load_pretrained(tmp_path, backbone_state):
    state = {k: v.to(torch.complex64) if k == "conv1.weight" else v
             for k, v in backbone_state.items()}
    save_file(state, tmp_path / "complex.safetensors")
    with pytest.raises(CheckpointError, match=r"conv1\.weight.*complex64"):
        histohub.load_pretrained(tmp_path / "complex.safetensors", arch="resnet18")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_floating_weights_and_integer_batch_counts_are_accepted(backbone_state, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v.to(torch.int32)
             for k, v in backbone_state.items()}
    mapped = map_state_dict(state, KeyMap(), shapes("resnet18"))
    assert mapped["conv1.weight"].dtype == dtype
    assert mapped["bn1.num_batches_tracked"].dtype == torch.int32
    bool_count = dict(backbone_state, **{"bn1.num_batches_tracked": torch.tensor(True)})
    with pytest.raises(CheckpointError, match="bn1.num_batches_tracked.*torch.bool"):
        map_state_dict(bool_count, KeyMap(), shapes("resnet18"))
