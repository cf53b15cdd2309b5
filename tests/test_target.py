"""Target model parity with transformers 5.24.0 (fp32), the cache (incremental decoding, rollback) and loading."""

import pytest
import torch

from tests import tiny
from weights import load_target

FAMILIES = list(tiny.TARGET_CONFIGS)
TOL = 1e-4


def _ids(n, seed=0, vocab=512):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_and_hidden_match_transformers(family, target_pair):
    hf, ours = target_pair(family)
    ids = torch.cat([_ids(40, 1), _ids(40, 2)])  # batch 2, five sliding windows
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids)
    err = (out.logits - ref.logits).abs().max().item()
    print(f"{family}: prefill max |logit error| = {err:.2e}")
    assert ref.logits.abs().max() > 1.0  # the comparison is not vacuous
    assert err < TOL
    torch.testing.assert_close(out.hidden_states, ref.hidden_states[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunks", [[1] * 30, [2, 3, 5, 4, 2, 5, 3, 1, 5]], ids=["one-by-one", "chunks"])
def test_incremental_decoding_equals_full_sequence(family, chunks, target_pair):
    hf, ours = target_pair(family)
    ids = _ids(sum(chunks), 3)
    with torch.no_grad():
        ref = hf(ids).logits
        cache = ours.new_cache(max_length=4)  # small on purpose: the full-layer buffers must grow
        start, rows = 0, []
        for n in chunks:
            rows.append(ours(ids[:, start : start + n], cache).logits)
            start += n
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(rows, 1), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep_gives_the_last_rows_and_skips_the_kv_shared_tail(family, target_pair):
    """A prefill with logits_to_keep=k returns the last k rows of the full pass (logits and hidden states), fills
    the cache exactly as the full pass does (decoding after it matches transformers), and runs the trailing
    KV-sharing layers on those k rows only."""
    hf, ours = target_pair(family)
    ids = _ids(30, 5)
    seen = []
    hook = ours.layers[-1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            ref = hf(ids, output_hidden_states=True)
            cache = ours.new_cache(max_length=32)
            out = ours(ids[:, :27], cache, logits_to_keep=3)
            decoded = ours(ids[:, 27:], cache).logits
    finally:
        hook.remove()
    torch.testing.assert_close(out.logits, ref.logits[:, 24:27], atol=TOL, rtol=0)
    torch.testing.assert_close(out.hidden_states, ref.hidden_states[-1][:, 24:27], atol=TOL, rtol=0)
    torch.testing.assert_close(decoded, ref.logits[:, 27:], atol=TOL, rtol=0)
    shares_kv = ours.config.layers[-1].kv_mode == "reuse"
    assert seen == [3 if shares_kv else 27, 3]
    assert (ours.kv_shared_from < len(ours.layers)) == shares_kv


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_equals_never_having_seen_the_tokens(family, target_pair):
    """Process k junk tokens, roll back r <= k of them (keeping k - r), continue: logits equal a fresh pass over
    the kept sequence. Repeated across several sliding windows (W = 8) with ring wrap-around."""
    _, ours = target_pair(family)
    gen = torch.Generator().manual_seed(4)
    kept = _ids(5, 5)
    cache = ours.new_cache(max_length=8, max_rollback=6)
    with torch.no_grad():
        ours(kept, cache)
        for step in range(12):
            k = int(torch.randint(1, 7, (1,), generator=gen))
            r = int(torch.randint(0, k + 1, (1,), generator=gen))
            block = torch.randint(0, 512, (1, k), generator=gen)
            ours(block, cache)
            cache.rollback(r)
            kept = torch.cat([kept, block[:, : k - r]], 1)
            assert cache.length == kept.shape[1]
            nxt = torch.randint(0, 512, (1, 2), generator=gen)
            got = ours(nxt, cache).logits
            want = ours(torch.cat([kept, nxt], 1)).logits[:, -2:]
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
            kept = torch.cat([kept, nxt], 1)
    assert kept.shape[1] > 4 * ours.config.sliding_window


def test_rollback_beyond_capacity_is_refused(target_pair):
    _, ours = target_pair("e2b")
    cache = ours.new_cache(max_rollback=2)
    with torch.no_grad():
        ours(_ids(20), cache)
        ours(_ids(3, 1), cache)
    with pytest.raises(Exception, match="max_rollback"):
        cache.rollback(3)


def test_multimodal_and_sharded_checkpoints_load_to_the_same_logits(tmp_path, target_pair):
    hf, ours = target_pair("e2b")
    ids = _ids(20, 6)
    mm = tiny.build_multimodal_target("e2b", seed=0)
    mm_dir = tiny.save(mm, tmp_path / "mm")
    sharded_dir = tiny.save(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    with torch.no_grad():
        mm_ref = mm(input_ids=ids).logits
        torch.testing.assert_close(load_target(mm_dir)(ids).logits, mm_ref, atol=TOL, rtol=0)
        torch.testing.assert_close(load_target(sharded_dir)(ids).logits, ours(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_as_close_to_fp32_as_transformers(dtype, checkpoint):
    """Our half-precision error against fp32 is of the order of transformers' own half-precision error."""
    from transformers import Gemma4ForCausalLM

    folder = checkpoint("moe")
    ids = _ids(24, 7)
    with torch.no_grad():
        exact = load_target(folder)(ids).logits
        ours = load_target(folder, dtype=dtype)
        assert ours.embed_tokens.weight.dtype == dtype
        ours_err = (ours(ids).logits.float() - exact).abs().max().item()
        hf_err = (Gemma4ForCausalLM.from_pretrained(folder, dtype=dtype)(ids).logits.float() - exact).abs().max().item()
    print(f"{dtype}: ours {ours_err:.3f}, transformers {hf_err:.3f}")
    assert ours_err < 2 * hf_err + 1e-2


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_hub_form_config_equals_the_saved_form(family, checkpoint, tmp_path, target_pair):
    """Released config.json files give the full-layer geometry as global_head_dim / num_global_key_value_heads;
    transformers writes per_layer_config instead. Both describe the same model."""
    import json
    import shutil

    folder = shutil.copytree(checkpoint(family), tmp_path / "hub-form")
    config = json.loads((folder / "config.json").read_text())
    assert "per_layer_config" in config and "global_head_dim" not in config
    del config["per_layer_config"]
    for key in ("global_head_dim", "num_global_key_value_heads"):
        if key in tiny.TARGET_CONFIGS[family]:
            config[key] = tiny.TARGET_CONFIGS[family][key]
    (folder / "config.json").write_text(json.dumps(config))
    _, ours = target_pair(family)
    ids = _ids(12, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_target(folder)(ids).logits, ours(ids).logits, atol=0, rtol=0)
