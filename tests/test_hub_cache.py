"""Checkpoints laid out as huggingface_hub's cache lays them out, and what an index may name.

In the cache, `models--org--name/snapshots/<rev>/<file>` is a relative symlink to `../../blobs/<sha256>` and
`refs/main` holds `<rev>`. A shard therefore resolves outside its snapshot folder, which must not be mistaken for
an index entry escaping the folder (`../x`, absolute paths), which must still be refused.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests import tiny
from weights import CheckpointError, load_drafter, load_target

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put every file of `folder` into `cache` as huggingface_hub stores a download; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot, blobs = repo / "snapshots" / REV, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for file in sorted(folder.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))  # relative, as the hub client writes it
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub uses, offline. Its constants are read from the environment at
    import, so they are patched as well as the environment."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _ids(n, seed):
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family, shard", [("e2b", None), ("31b", "60KB")], ids=["single-file", "sharded"])
def test_hub_cache_checkpoint_loads_by_repo_id_and_by_snapshot_path(family, shard, offline_cache, tmp_path,
                                                                    target_pair):
    from transformers import Gemma4ForCausalLM

    hf, _ = target_pair(family)
    saved = tiny.save(hf, tmp_path / "saved", max_shard_size=shard)
    snapshot = hub_cache(offline_cache, "tiny-org/gemma4", saved)
    shards = sorted(snapshot.glob("*.safetensors"))
    assert len(shards) == 1 if shard is None else len(shards) >= 2
    assert all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in shards)
    assert all(p.resolve().parent == offline_cache / "models--tiny-org--gemma4" / "blobs" for p in shards)
    if shard is not None:
        assert (snapshot / "model.safetensors.index.json").is_symlink()

    ids = _ids(24, 4)
    with torch.no_grad():
        ref = Gemma4ForCausalLM.from_pretrained(snapshot, attn_implementation="eager").eval()(ids).logits
        torch.testing.assert_close(ref, hf(ids).logits, atol=0, rtol=0)
        by_id = load_target("tiny-org/gemma4")
        assert Path(by_id.checkpoint_dir) == snapshot
        torch.testing.assert_close(by_id(ids).logits, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_target(snapshot)(ids).logits, ref, atol=1e-4, rtol=0)


def test_hub_cache_drafter_loads_by_repo_id(offline_cache, checkpoint, drafter_checkpoint):
    target = load_target(checkpoint("e2b"))
    snapshot = hub_cache(offline_cache, "tiny-org/gemma4-assistant", drafter_checkpoint("e2b"))
    by_id = load_drafter("tiny-org/gemma4-assistant", target=target)
    direct = load_drafter(drafter_checkpoint("e2b"), target=target)
    assert Path(by_id.checkpoint_dir) == snapshot
    assert by_id.state_dict().keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(by_id.state_dict()[name], tensor), name


def test_a_shard_may_be_a_symlink_to_anywhere_but_an_index_name_may_not_leave_the_folder(checkpoint, tmp_path):
    """Symlinks are the folder owner's doing (the hub client, the user); names come with the index."""
    hf_dir = checkpoint("e2b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(hf_dir / "model.safetensors", elsewhere / "weights.bin-blob")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(hf_dir / name, folder / name)
    (folder / "shard-1.safetensors").symlink_to(elsewhere / "weights.bin-blob")  # absolute symlink target
    with safe_open(hf_dir / "model.safetensors", framework="pt") as f:
        index = {"weight_map": {k: "shard-1.safetensors" for k in f.keys()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = _ids(12, 5)
    with torch.no_grad():
        torch.testing.assert_close(load_target(folder)(ids).logits, load_target(hf_dir)(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", [
    "../evil.safetensors", "sub/../../evil.safetensors", "/tmp/evil.safetensors", "..\\evil.safetensors",
    "C:\\evil.safetensors", "C:evil.safetensors", "\\\\server\\share\\evil.safetensors",
])
def test_index_entries_naming_a_path_outside_the_folder_are_refused(name, checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("e2b"), folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    if not name.startswith(("/", "C:", "\\")):  # make the escaping target exist, so only the name is at fault
        shutil.copyfile(folder / "model-00001-of-00001.safetensors", tmp_path / "evil.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": name}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_target(folder)


@pytest.mark.parametrize("name", [3, None, "model.bin"])
def test_index_entries_that_are_not_safetensors_file_names_are_refused(name, checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("e2b"), folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": name}}))
    with pytest.raises(CheckpointError, match="not a \\*.safetensors file name"):
        load_target(folder)
