"""Property test: the cache is exact under any acceptance pattern.

Hypothesis draws a prompt, a sequence of (draft length, accepted count) rounds and chunk sizes, and drives our
cache exactly as the loop does (verify k + 1 tokens, roll back the k - n rejected ones) across several sliding
windows. After every round, the logits of the next verify pass must equal a from-scratch forward over the accepted
sequence (no cache), and the drafter's view must hold exactly the accepted positions."""

import functools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4 import Gemma4Config, Gemma4Model
from tests import tiny

TOL = 1e-4


@functools.cache
def model(family: str) -> Gemma4Model:
    """Our model with randomized weights (the oracle here is our own no-cache forward, so no checkpoint needed)."""
    config = Gemma4Config(**tiny.TARGET_CONFIGS[family])
    torch.manual_seed(0)
    m = Gemma4Model(config).eval()
    tiny.randomize(m, seed=0)
    return m


rounds = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=4, max_size=12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["e2b", "31b", "moe_kvshare"]), prompt_len=st.integers(1, 20), rounds=rounds,
       seed=st.integers(0, 2**16))
def test_verify_and_rollback_match_recomputation(family, prompt_len, rounds, seed):
    target = model(family)
    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    accepted = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    cache = target.new_cache(max_length=4, max_rollback=7, min_sliding_history=target.config.sliding_window + 1)
    with torch.inference_mode():
        target(accepted[:, :-1], cache) if prompt_len > 1 else None
        for k, n in rounds:
            n = min(n, k)
            block = torch.cat([accepted[:, -1:], torch.randint(0, vocab, (1, k), generator=gen)], 1)  # [last ; drafts]
            got = target(block, cache).logits
            want = target(torch.cat([accepted, block[:, 1:]], 1)).logits[:, -(k + 1):]
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
            cache.rollback(k - n)
            accepted = torch.cat([accepted, block[:, 1 : n + 1], torch.randint(0, vocab, (1, 1), generator=gen)], 1)
            assert cache.length == accepted.shape[1] - 1
            for attention_type, view in cache.views().items():
                held = set(view.positions[view.positions >= 0].tolist())
                assert max(held, default=-1) == cache.length - 1  # nothing rejected is visible
                if attention_type == "full_attention":
                    assert held == set(range(cache.length))
                else:
                    assert set(range(max(0, cache.length - cache.history), cache.length)) <= held
