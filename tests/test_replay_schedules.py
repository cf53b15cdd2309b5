"""scripts/replay_schedules.py replays the draft-length schedules in arithmetic from recorded acceptance. Its claim:
under greedy decoding a row's accepted count in a round at position p is min(k, A(p)) for every k, and the rest is
the loop's bookkeeping. The oracle is the loop itself: on the bundled pair, the replayed rounds of constant N and of
`auto` (both fed the same fixed costs) accept, row by row and round by round, what `generate_batch` accepts."""

import importlib.util
from pathlib import Path

import pytest
import torch

from speculative import generate_batch
from weights import load_drafter, load_target

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("replay_schedules", ROOT / "scripts" / "replay_schedules.py")
replay_schedules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay_schedules)

NEW, K = 20, 4
COSTS = {1: [1.0 + 0.3 * k for k in range(K + 1)], 2: [1.2 + 0.4 * k for k in range(K + 1)],
         4: [1.5 + 0.5 * k for k in range(K + 1)]}  # seconds of a round by rows and k (made up, fixed)


@pytest.fixture(scope="module")
def recorded():
    from benchmark import held_out_prompts, prose_prompts

    models = ROOT / "tiny_gemma4"
    target = load_target(models / "target", dtype=torch.float32)
    drafter = load_drafter(models / "drafter", target=target)
    prompts = held_out_prompts(models, 2, 24) + prose_prompts(models, 2, 24)
    return target, drafter, prompts, replay_schedules.accepted_counts(target, drafter, prompts, NEW, K)


def loop_rounds(target, drafter, prompts, **options) -> dict[int, list[int]]:
    rounds: dict[int, list[int]] = {}
    generate_batch(target, drafter, prompts, max_new_tokens=NEW, stop_token_ids=[],
                   on_round=lambda b, info: rounds.setdefault(b, []).append(info.accepted), **options)
    return {b: accepted[1:] for b, accepted in rounds.items()}  # report 0: the prefill's token


@pytest.mark.parametrize("n", [1, 2, 4])
def test_replayed_constant_n_accepts_what_the_loop_accepts(recorded, n):
    target, drafter, prompts, counts = recorded
    replayed: dict[int, list[int]] = {}
    replay_schedules.replay(counts, COSTS, NEW, K, n, log=replayed)
    assert replayed == loop_rounds(target, drafter, prompts, schedule="constant", num_draft_tokens=n)
    assert all(sum(a + 1 for a in row) == NEW - 1 for row in replayed.values())  # every row reached its budget


def test_replayed_auto_makes_the_loops_choices(recorded):
    """The same costs on both sides (a fresh RecordedCosts each, so the same carried acceptance: none): the replay's
    AutoPlanner sees what the loop's sees, so it chooses the same k every round and the rows accept the same."""
    target, drafter, prompts, counts = recorded
    replayed: dict[int, list[int]] = {}
    _, ks = replay_schedules.replay(counts, COSTS, NEW, K, None, replay_schedules.RecordedCosts(COSTS), log=replayed)
    assert replayed == loop_rounds(target, drafter, prompts, schedule="auto", num_draft_tokens=K,
                                   costs=replay_schedules.RecordedCosts(COSTS))
    assert len(set(ks)) > 1, ks  # the choices moved: the comparison covers more than one k
