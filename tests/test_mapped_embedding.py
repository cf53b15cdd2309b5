"""The per-layer-embedding table kept memory-mapped from the checkpoint (weights/mapped.py): the same logits, bit for
bit, as the table loaded into memory, in every compute dtype and from fp32 and bf16 checkpoints, and no resident
memory for the table."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gemma4 import Gemma4Config, Gemma4Model
from tests import tiny
from weights import CheckpointError, load_target
from weights.mapped import MappedEmbedding

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _stored_as(folder: Path, dtype: torch.dtype, dst: Path) -> Path:
    """A copy of checkpoint `folder` with every floating tensor stored in `dtype`."""
    shutil.copytree(folder, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, file,
                  metadata={"format": "pt"})
    return dst


@torch.no_grad()
def _logits(model: Gemma4Model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Whole-sequence logits, then a cached prefill and three one-token decodes (the decode path's gathers)."""
    out = [model(ids).logits]
    cache = model.new_cache(max_length=ids.shape[1] + 4)
    out.append(model(ids[:, :-3], cache).logits)
    out += [model(ids[:, i : i + 1], cache).logits for i in range(ids.shape[1] - 3, ids.shape[1])]
    return out


def _assert_mapped_equals_loaded(folder: Path, dtype: torch.dtype, vocab: int) -> None:
    mapped = load_target(folder, dtype=dtype)  # the default on CPU
    loaded = load_target(folder, dtype=dtype, map_per_layer_table=False)
    assert isinstance(mapped.embed_tokens_per_layer, MappedEmbedding)
    assert type(loaded.embed_tokens_per_layer) is nn.Embedding
    ids = _ids(24, vocab)
    for got, want in zip(_logits(mapped, ids), _logits(loaded, ids)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert torch.equal(got, want)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mapped_table_gives_the_loaded_tables_logits_bit_for_bit(stored, dtype, checkpoint, tmp_path_factory):
    folder = checkpoint("e2b")  # saved in float32
    if stored != torch.float32:
        folder = _stored_as(folder, stored, tmp_path_factory.mktemp("stored") / "ckpt")
    _assert_mapped_equals_loaded(folder, dtype, tiny.E2B_LIKE["vocab_size"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bundled_target_mapped_gives_the_loaded_logits_bit_for_bit(dtype):
    folder = ROOT / "tiny_gemma4" / "target"  # stored in bfloat16
    _assert_mapped_equals_loaded(folder, dtype, json.loads((folder / "config.json").read_text())["vocab_size"])


def test_multimodal_checkpoint_maps_its_language_models_table(tmp_path):
    folder = tiny.save(tiny.build_multimodal_target("e4b", seed=2), tmp_path / "mm")  # keys model.language_model.*
    _assert_mapped_equals_loaded(folder, torch.float32, tiny.E4B_LIKE["vocab_size"])


def test_introspection_sees_the_mapped_table(checkpoint):
    """parameters(), state_dict(), load_state_dict(), .to() and repr behave as with a loaded table, without ever
    converting or copying the mapped one."""
    folder = checkpoint("e2b")
    mapped, loaded = load_target(folder), load_target(folder, map_per_layer_table=False)
    table = mapped.embed_tokens_per_layer.weight
    assert sum(p.numel() for p in mapped.parameters()) == sum(p.numel() for p in loaded.parameters())
    state = mapped.state_dict()
    assert list(state) == list(loaded.state_dict())
    assert torch.equal(state["embed_tokens_per_layer.weight"], loaded.embed_tokens_per_layer.weight)
    assert "stored torch.float32 on the host, rows as torch.float32 on cpu" in repr(mapped.embed_tokens_per_layer)

    ids = _ids(12, 512, seed=3)
    with torch.no_grad():
        fresh = Gemma4Model(mapped.config).eval()  # a state_dict round trip, both ways
        fresh.load_state_dict(mapped.state_dict())
        assert torch.equal(fresh(ids).logits, loaded(ids).logits)
        changed = {k: v.clone() for k, v in loaded.state_dict().items()}
        changed["embed_tokens_per_layer.weight"] += 1e-3  # values the file does not hold: kept exactly
        mapped.load_state_dict(changed)
        loaded.load_state_dict(changed)
        assert torch.equal(mapped(ids).logits, loaded(ids).logits)

        again = load_target(folder)
        assert torch.equal(again.embed_tokens_per_layer.weight, table)  # the file is untouched
        where = again.embed_tokens_per_layer.weight.data_ptr()
        again.to(torch.bfloat16)  # the rows' dtype changes, the table stays the file's
        assert again.embed_tokens_per_layer.weight.data_ptr() == where
        assert again.embed_tokens_per_layer.weight.dtype == torch.float32
        assert torch.equal(again(ids).logits, load_target(folder, dtype=torch.bfloat16)(ids).logits)


def test_a_wrong_table_shape_is_reported_as_for_any_tensor(checkpoint, tmp_path):
    folder = shutil.copytree(checkpoint("e2b"), tmp_path / "ckpt")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    tensors["model.embed_tokens_per_layer.weight"] = tensors["model.embed_tokens_per_layer.weight"][:-1].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens_per_layer.weight' has shape \[511, 64\]"):
        load_target(folder)


def test_mapping_needs_a_host_table():
    with pytest.raises(ValueError, match="2-D floating-point host tensor"):
        MappedEmbedding(torch.zeros(4, dtype=torch.int64), dtype=torch.float32)


_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from weights import load_target

    def rss() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    folder, out, models = sys.argv[1], {}, []
    for label, dtype, mapped in [("warm-up", torch.float32, True),  # a first load imports ~70 MB of modules
                                 ("mapped fp32", torch.float32, True), ("mapped bf16", torch.bfloat16, True),
                                 ("loaded fp32", torch.float32, False)]:
        before = rss()
        models.append(load_target(folder, dtype=dtype, map_per_layer_table=mapped))
        with torch.no_grad():
            models[-1](torch.randint(0, 512, (1, 16)))
        out[label] = rss() - before
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_loading_does_not_make_the_table_resident(tmp_path):
    """A 128 MB table: a mapped load (and a forward) grows the resident set by far less than the table, a full
    load by at least most of it (so the measurement can see a table). Measured in a fresh process."""
    config = dict(tiny.E2B_LIKE, model_type="gemma4_text", hidden_size_per_layer_input=256,
                  vocab_size_per_layer_input=16384)  # table [16384, 8 * 256] float32: 128 MiB
    with torch.device("meta"):
        shapes = Gemma4Model(Gemma4Config.from_dict(config)).state_dict()
    gen = torch.Generator().manual_seed(0)
    tensors = {"model." + k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in shapes.items()}
    table = tensors["model.embed_tokens_per_layer.weight"].numel() * 4
    others = sum(v.numel() * 4 for k, v in tensors.items()) - table
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    del tensors
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grown = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: f"{v / 2**20:.1f} MiB" for k, v in grown.items()}, f"table {table / 2**20:.0f} MiB, "
          f"other weights {others / 2**20:.1f} MiB")
    assert others < table / 16  # the table dominates, so a resident table cannot hide in the noise
    assert grown["mapped fp32"] < others + table / 4
    assert grown["mapped bf16"] < others + table / 4
    assert grown["loaded fp32"] > table * 3 / 4


def test_the_table_stays_on_the_device_when_it_fits_there_with_room_to_spare():
    """load_target's default: mapped on the host on CPU; on a GPU loaded when table + other weights + headroom
    (10% of the free memory, at least 2 GB) fit in the free memory, else mapped (E2B in bfloat16: a 4.7 GB table
    next to ~5 GB of other weights)."""
    from weights.loader import per_layer_table_on_host

    GB = 1 << 30
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    table, other = int(4.7 * GB), 5 * GB
    assert per_layer_table_on_host(cpu, table, other, None)
    assert not per_layer_table_on_host(cuda, table, other, 80 * GB)  # an 80 GB GPU: on the device
    assert per_layer_table_on_host(cuda, table, other, 11 * GB)  # fits, but leaves less than 2 GB
    assert not per_layer_table_on_host(cuda, table, other, 12 * GB)
    assert per_layer_table_on_host(cuda, table, other, 6 * GB)  # a small GPU: the other weights only
    assert not per_layer_table_on_host(torch.device("mps"), table, other, None)  # free memory unknown: load it
