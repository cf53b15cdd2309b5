"""Hostile or broken checkpoints: one clear CheckpointError, never a crash, a hang, code execution, or a model
that silently differs from the file. Includes a fuzz test over randomly corrupted copies of a tiny checkpoint."""

import json
import random
import shutil
import struct

import pytest
import torch

from weights import CheckpointError, load_target


@pytest.fixture(scope="module")
def original(checkpoint):
    folder = checkpoint("31b")
    ids = torch.arange(1, 21)[None]
    with torch.no_grad():
        return folder, ids, load_target(folder)(ids).logits


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _header(file):
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(file, header, body):
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_header_that_lies_about_offsets(original, tmp_path):
    folder = _copy(original[0], tmp_path / "c")
    header, body = _header(folder / "model.safetensors")
    header["model.norm.weight"]["data_offsets"][1] += 10**9  # points past the end of the file
    _write(folder / "model.safetensors", header, body)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_target(folder)


def test_absurd_header_length(original, tmp_path):
    folder = _copy(original[0], tmp_path / "c")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_target(folder)


def test_unknown_dtype(original, tmp_path):
    folder = _copy(original[0], tmp_path / "c")
    header, body = _header(folder / "model.safetensors")
    header["model.norm.weight"]["dtype"] = "F7"
    _write(folder / "model.safetensors", header, body)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_target(folder)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_size", "64", "hidden_size must be an integer"),
        ("num_hidden_layers", -6, "num_hidden_layers must be positive"),
        ("layer_types", ["sliding_attention"], "layer_types has 1 entries"),
        ("layer_types", ["diagonal_attention"] * 6, "unknown layer types"),
        ("attention_k_eq_v", "yes", "attention_k_eq_v must be true or false"),
        ("rms_norm_eps", None, "rms_norm_eps must be a positive number"),
        ("num_key_value_heads", 3, "not a multiple of its 3 key/value heads"),
        ("rope_parameters", {"full_attention": {"rope_type": "yarn"}}, "rope_parameters has no entry|not supported"),
    ],
)
def test_config_with_wrong_types_or_impossible_sizes(original, tmp_path, field, value, message):
    folder = _copy(original[0], tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_target(folder)


def test_config_that_is_not_an_object(original, tmp_path):
    folder = _copy(original[0], tmp_path / "c")
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_target(folder)


def _mutate(rng, folder):
    """One random corruption: flipped header bytes, a truncation, or a config value swapped for junk."""
    kind = rng.choice(["header", "truncate", "config"])
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "header":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 8 + n)] = rng.randrange(256)
        file.write_bytes(bytes(data))
    elif kind == "truncate":
        file.write_bytes(bytes(data[: rng.randrange(0, len(data))]))
    else:
        config = json.loads((folder / "config.json").read_text())
        key = rng.choice(sorted(config))
        config[key] = rng.choice([None, -1, 0, 10**12, "x", [], {}, 3.5, True])
        (folder / "config.json").write_text(json.dumps(config))
    return kind


def test_fuzz_corrupted_checkpoints_load_exactly_or_fail_clearly(original, tmp_path):
    """60 corrupted copies: each raises CheckpointError (no other exception escapes) or loads; a damaged
    safetensors file that loads must give bit-identical logits."""
    folder, ids, logits = original
    rng = random.Random(0)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(60):
        copy = _copy(folder, tmp_path / f"c{i}")
        kind = _mutate(rng, copy)
        try:
            model = load_target(copy)
        except CheckpointError as e:
            assert str(e)  # a message, never an empty error
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        if kind == "config":
            continue  # a junk value can still be a valid config (eps 3.5 is a different model, not a corrupt one)
        with torch.no_grad():  # a damaged weights file that still loads must hold the same model
            torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)
    assert outcomes["refused"] > 30
