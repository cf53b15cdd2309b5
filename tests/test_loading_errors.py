"""Every way a checkpoint can be wrong gives an error whose message names the problem, never random weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights import CheckpointError, files, load_drafter, load_target


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    def make(family="e2b"):
        dst = tmp_path / "ckpt"
        shutil.copytree(checkpoint(family), dst)
        return dst

    return make


def test_path_not_found(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_target(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a hub repo id"):
        load_target("./definitely/not/here")


def test_a_mistyped_local_path_is_a_missing_folder_not_a_hub_request(tmp_path, monkeypatch):
    """`pair/targt` looks like a hub id (org/name), but `pair/` is a folder here: the user mistyped a local path.
    The error says which folder is missing and what its parent holds; the hub is never asked."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    (tmp_path / "pair" / "target").mkdir(parents=True)
    (tmp_path / "pair" / "drafter").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no folder pair/targt \(pair/ holds drafter, target\)"):
        load_target("pair/targt")


def test_no_config_json(copy_of):
    folder = copy_of()
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_target(folder)


def test_unknown_model_type(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_target(folder)


def test_config_with_impossible_sizes(copy_of):
    folder = copy_of("31b")  # 2 KV heads on sliding layers
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a multiple"):
        load_target(folder)


def _rewrite(folder: Path, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(copy_of):
    folder = copy_of()
    _rewrite(folder, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        load_target(folder)


def test_wrong_shape(copy_of):
    folder = copy_of()
    _rewrite(folder, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:10]}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[10\], expected \[64\]"):
        load_target(folder)


def test_truncated_safetensors(copy_of):
    folder = copy_of()
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        load_target(folder)


def test_pickle_only_checkpoint_is_refused(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_target(folder)


def test_shard_index_escaping_the_folder(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")  # else the index is unread
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../evil.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_target(folder)


def test_model_safetensors_is_loaded_and_a_stray_weights_file_beside_it_is_not(copy_of):
    """transformers reads model.safetensors when present and nothing else; "old-copy.safetensors" sorts after it,
    and loading every file (as this project once did) let the stray file's tensors win."""
    from transformers import Gemma4ForCausalLM

    folder = copy_of()
    stray = {k: v + 1.0 for k, v in load_file(folder / "model.safetensors").items()}
    save_file(stray, folder / "old-copy.safetensors", metadata={"format": "pt"})
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        ref = Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()(ids).logits
        torch.testing.assert_close(load_target(folder)(ids).logits, ref, atol=1e-4, rtol=0)


def test_model_safetensors_wins_over_an_index_as_in_transformers(copy_of):
    folder = copy_of()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})  # stale: no such shard
    )
    assert load_target(folder).config.num_hidden_layers == 8


def test_weights_under_another_name_with_no_index_are_refused_naming_the_files(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").rename(folder / "weights-b.safetensors")
    shutil.copyfile(folder / "weights-b.safetensors", folder / "weights-a.safetensors")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors and no model\.safetensors\.index\.json, only "
                                              r"weights-a\.safetensors, weights-b\.safetensors"):
        load_target(folder)


def test_incompatible_drafter(checkpoint, drafter_checkpoint):
    target = load_target(checkpoint("31b"))
    with pytest.raises(ValueError, match="drafter does not fit the target"):
        load_drafter(drafter_checkpoint("e2b"), target=target)


def test_hub_repo_id_offline(checkpoint, tmp_path):
    """A repo id goes through huggingface_hub: served from a populated HF_HOME cache offline, and a clear error
    for a repo that is neither local nor cached."""
    snapshot = tmp_path / "hub" / "models--tiny-org--gemma4-e2b" / "snapshots" / ("a" * 40)
    shutil.copytree(checkpoint("e2b"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = (
        "import sys\n"
        "from weights import load_target, CheckpointError\n"
        "m = load_target('tiny-org/gemma4-e2b')\n"
        "print('loaded', m.config.num_hidden_layers)\n"
        "try:\n    load_target('tiny-org/not-cached')\nexcept CheckpointError as e:\n    print('error:', e)\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "loaded 8" in out.stdout
    assert "error: cannot fetch 'tiny-org/not-cached'" in out.stdout


@pytest.mark.parametrize("error, message", [("GatedRepoError", "is gated: accept its licence"),
                                            ("RepositoryNotFoundError", "no hub repository")])
def test_hub_refusals_say_what_to_do(monkeypatch, error, message):
    """A gated repo (a subclass of 'not found' in huggingface_hub) says to accept the licence and log in, not that
    the repository does not exist."""
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(*args, **kwargs):
        raise getattr(errors, error)("refused", response=_FakeResponse())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError, match=message):
        files.resolve_checkpoint("google/gemma-4-E2B-it")


class _FakeResponse:
    """Just enough of an HTTP response for huggingface_hub's error classes."""

    status_code = 401
    headers: dict = {}
    url = "https://huggingface.co/google/gemma-4-E2B-it"
    request = None

    def json(self):
        return {}
