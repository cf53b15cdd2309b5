"""Drafter parity with transformers' Gemma4AssistantForCausalLM (fp32), given the same target K/V and hidden state.

Oracle inputs: a transformers forward of the target over the accepted tokens returns `shared_kv_states` (K/V of
every position, no cache) and the post-norm hidden states; our drafter reads the same positions through our
cache's clean views, after the cache has been through verify-and-rollback cycles."""

import functools

import pytest
import torch

from gemma4 import KVView
from tests import tiny
from weights import load_drafter, load_target

TOL = 1e-4
PAIRS = list(tiny.PAIRS.items())


@pytest.fixture(scope="module")
def pair(checkpoint, drafter_checkpoint):
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    @functools.cache
    def make(family, kind):
        t, d = checkpoint(family), drafter_checkpoint(kind)
        hf_t = Gemma4ForCausalLM.from_pretrained(t, attn_implementation="eager").eval()
        hf_d = Gemma4AssistantForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        ours_t = load_target(t)
        return hf_t, hf_d, ours_t, load_drafter(d, target=ours_t)

    return make


def _cache_after_rollbacks(target, drafter, ids):
    """A cache holding ids[:, :p] that got there through verify passes with rejected tokens rolled back."""
    gen = torch.Generator().manual_seed(0)
    cache = target.new_cache(max_length=8, max_rollback=6, min_sliding_history=drafter.sliding_history)
    target(ids[:, :2], cache)
    while cache.length < ids.shape[1]:
        n = min(int(torch.randint(1, 5, (1,), generator=gen)), ids.shape[1] - cache.length)
        junk = torch.randint(0, 512, (1, int(torch.randint(0, 3, (1,), generator=gen))), generator=gen)
        target(torch.cat([ids[:, cache.length : cache.length + n], junk], 1), cache)
        cache.rollback(junk.shape[1])
    return cache


@pytest.mark.parametrize("family,kind", PAIRS)
@pytest.mark.parametrize("p", [3, 7, 30])  # before, at and well past the sliding window (W = 8)
def test_draft_steps_match_transformers(family, kind, p, pair):
    """Given transformers' target K/V and hidden state, each of four chained draft steps gives transformers'
    logits and projected hidden state; run on our own cache and our own chain, the drafted tokens are the same."""
    hf_t, hf_d, target, drafter = pair(family, kind)
    ids = torch.randint(0, 512, (1, p + 1), generator=torch.Generator().manual_seed(p))
    with torch.no_grad():
        ref = hf_t(ids[:, :p], return_shared_kv_states=True, output_hidden_states=True)
        same_kv = {t: KVView(k, v, torch.arange(k.shape[2])) for t, (k, v) in ref.shared_kv_states.items()}
        our_views = _cache_after_rollbacks(target, drafter, ids[:, :p]).views()
        tok_ref, h_ref = ids[:, p:], ref.hidden_states[-1][:, -1:]
        tok, h = tok_ref, target(ids[:, :p]).hidden_states[:, -1:]
        for step in range(4):  # chained draft steps at the constant position p
            emb = hf_t.get_input_embeddings()(tok_ref)
            want = hf_d(inputs_embeds=torch.cat([emb, h_ref], -1), position_ids=torch.tensor([[p]]),
                        shared_kv_states=ref.shared_kv_states)
            got = drafter.step(target, tok_ref, h_ref, p, same_kv)
            finite = torch.isfinite(got.logits)
            if drafter.config.use_ordered_embeddings:
                # the same tokens are selected; transformers fills the rest with min - 1 instead of -inf
                assert torch.equal(finite, want.logits > want.logits.min())
            assert want.logits.abs().max() > 0.5
            torch.testing.assert_close(got.logits[finite], want.logits[finite], atol=TOL, rtol=0)
            torch.testing.assert_close(got.hidden, want.last_hidden_state, atol=TOL, rtol=0)
            ours = drafter.step(target, tok, h, p, our_views)
            tok, h = ours.logits.argmax(-1), ours.hidden
            tok_ref, h_ref = want.logits.argmax(-1), want.last_hidden_state
            assert torch.equal(tok, tok_ref)


@pytest.mark.parametrize("family", list(tiny.TARGET_CONFIGS))
def test_cache_views_hold_the_accepted_kv(family, pair):
    """views(): full type = K/V of positions [0, p) exactly; sliding type = at least the last W_a + 1 of them,
    each at its recorded position, and nothing at or after p."""
    hf_t, _, target, drafter = pair(family, tiny.PAIRS[family])
    p = 27
    ids = torch.randint(0, 512, (1, p), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_t(ids, return_shared_kv_states=True).shared_kv_states
        views = _cache_after_rollbacks(target, drafter, ids).views()
    full = views["full_attention"]
    torch.testing.assert_close(full.k, ref["full_attention"][0], atol=TOL, rtol=0)
    torch.testing.assert_close(full.v, ref["full_attention"][1], atol=TOL, rtol=0)
    sliding = views["sliding_attention"]
    positions = sliding.positions[0]  # [T] of the one row
    held = positions[positions >= 0]
    assert held.max() == p - 1 and set(range(p - drafter.sliding_history, p)) <= set(held.tolist())
    for slot in torch.nonzero(positions >= 0).flatten().tolist():
        pos = int(positions[slot])
        torch.testing.assert_close(sliding.k[:, :, slot], ref["sliding_attention"][0][:, :, pos], atol=TOL, rtol=0)
        torch.testing.assert_close(sliding.v[:, :, slot], ref["sliding_attention"][1][:, :, pos], atol=TOL, rtol=0)


def test_masked_head_gives_zero_probability_outside_selected_clusters(pair):
    _, _, target, drafter = pair("31b", "ordered")
    assert drafter.config.use_ordered_embeddings
    torch.manual_seed(0)
    h = torch.randn(2, 3, drafter.config.text.hidden_size)
    logits = drafter.head(h)
    probs = torch.softmax(logits.float(), dim=-1)
    head = drafter.masked_embedding
    top = torch.topk(head.centroids(h), head.top_k, dim=-1).indices
    clusters = head.token_ordering.view(head.num_centroids, -1)
    allowed = torch.zeros_like(probs, dtype=torch.bool)
    allowed.scatter_(-1, clusters[top].flatten(-2), True)
    vocab_per_cluster = clusters.shape[1]
    assert allowed.sum(-1).eq(head.top_k * vocab_per_cluster).all()
    assert probs[~allowed].eq(0).all() and torch.isneginf(logits[~allowed]).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    full = h @ drafter.model.embed_tokens.weight.T  # inside the clusters, the logits are the plain head's
    torch.testing.assert_close(logits[allowed], full[allowed])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(backbone_hidden_size=48), "backbone_hidden_size=48 but target hidden_size=64"),
        (dict(text_config=dict(vocab_size=256)), "drafter vocab_size=256 but target vocab_size=512"),
        (dict(text_config=dict(head_dim=8)), "sliding_attention: drafter head_dim=8 but target head_dim=16"),
        (dict(text_config=dict(num_key_value_heads=2, num_attention_heads=4)),
         "sliding_attention: drafter expects 2 KV heads but target has 1"),
        (dict(text_config=dict(global_head_dim=64)), "full_attention: drafter head_dim=64 but target head_dim=32"),
    ],
)
def test_compatibility_check_names_the_mismatch(change, message):
    from drafter import DrafterConfig, IncompatibleDrafterError, check_compatible
    from gemma4 import Gemma4Config

    target = Gemma4Config.from_dict({"model_type": "gemma4_text", **tiny.TARGET_CONFIGS["e2b"]})
    raw = {"model_type": "gemma4_assistant", **tiny.DRAFTER_CONFIGS["e2b"]}
    raw.update({k: v for k, v in change.items() if k != "text_config"})
    raw["text_config"] = {**raw["text_config"], **change.get("text_config", {})}
    check_compatible(DrafterConfig.from_dict({"model_type": "gemma4_assistant", **tiny.DRAFTER_CONFIGS["e2b"]}), target)
    with pytest.raises(IncompatibleDrafterError, match=message):
        check_compatible(DrafterConfig.from_dict(raw), target)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model_type="gemma4_text"), "model_type 'gemma4_assistant'"),
        (dict(num_centroids=7), "not divisible by num_centroids=7"),
        (dict(text_config=dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=512)), "no per-layer embeddings"),
    ],
)
def test_invalid_drafter_configs_are_refused(change, message):
    from drafter import DrafterConfig
    from gemma4 import ConfigError

    raw = {"model_type": "gemma4_assistant", **tiny.DRAFTER_CONFIGS["ordered"]}
    raw.update({k: v for k, v in change.items() if k != "text_config"})
    raw["text_config"] = {**raw["text_config"], **change.get("text_config", {})}
    with pytest.raises(ConfigError, match=message):
        DrafterConfig.from_dict(raw)
