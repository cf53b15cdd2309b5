"""Long generation: many sliding windows of speculative decoding stay exact, and memory is the cache's alone.

Oracle: target-only greedy decoding, itself checked against a no-cache argmax loop in test_speculative.py."""

import pytest
import torch

from gemma4 import KVCache
from speculative import generate
from tests.test_speculative import PROMPT, coin, reference, run, target_for


@pytest.mark.parametrize("family", ["e2b", "moe_kvshare"])
@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
def test_ten_windows_of_speculative_decoding_equal_target_only(family, schedule):
    window = target_for(family).config.sliding_window
    result, reports, reference = run(family, coin(7, 0.7), 10 * window, schedule=schedule, num_draft_tokens=3)
    assert result.tokens == reference
    assert 0 < result.stats.acceptance_rate < 1  # a real mix of accepted and rejected drafts


def test_memory_does_not_grow_with_rounds(monkeypatch):
    """One cache per generation, sized up front: no buffer is ever reallocated, whatever the number of rounds."""
    reference("e2b", tuple(PROMPT), 96)  # the oracle's own generation runs before counting
    made, grown = [], []
    init, grow = KVCache.__init__, KVCache._grow

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def recording_grow(self, needed):
        before = {layer: k.data_ptr() for layer, k in self._k.items()}
        grow(self, needed)
        grown.extend(layer for layer, k in self._k.items() if k.data_ptr() != before[layer])

    monkeypatch.setattr(KVCache, "__init__", recording_init)
    monkeypatch.setattr(KVCache, "_grow", recording_grow)
    result, _, _ = run("e2b", coin(3, 0.5), 96, num_draft_tokens=4)
    assert len(result.stats.rounds) > 20
    assert len(made) == 1 and grown == []
    monkeypatch.undo()
    target = target_for("e2b")  # and target-only decoding: the same
    monkeypatch.setattr(KVCache, "__init__", recording_init)
    monkeypatch.setattr(KVCache, "_grow", recording_grow)
    made.clear()
    generate(target, None, PROMPT, max_new_tokens=64, stop_token_ids=[])
    assert len(made) == 1 and grown == []
