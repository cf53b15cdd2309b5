"""How many tokens to draft next round (docs/transformers.md: transformers ignores its schedule; this one works).

- `constant`: k every round.
- `heuristic`: all drafted tokens accepted -> k + 2; any rejected -> max(1, k - 1). A round that drafted nothing
  (the budget allowed only the target's own token) leaves k unchanged.
k never exceeds MAX_DRAFT_TOKENS: a verify pass over k + 1 tokens costs about one decode step only while k is small
(the weights are read once for all rows), and the cache reserves max_rollback = k_max + 1 ring slots per sliding
layer. The loop additionally clamps each round's k to the remaining budget and positions.
"""

from __future__ import annotations

MAX_DRAFT_TOKENS = 32  # the largest k any schedule (or the user) may ask for
DEFAULT_DRAFT_TOKENS = 6  # when the drafter's generation_config has no num_assistant_tokens (released drafters: 6)
SCHEDULES = ("constant", "heuristic")


def next_num_draft_tokens(schedule: str, k: int, drafted: int, accepted: int) -> int:
    """The k of the next round, given this round's scheduled k and its [drafted, accepted] counts."""
    if schedule == "constant" or drafted == 0:
        return k
    if accepted == drafted:
        return min(k + 2, MAX_DRAFT_TOKENS)
    return max(1, k - 1)


def max_num_draft_tokens(schedule: str, k: int) -> int:
    """The largest k a round can use under this schedule (it sizes the cache's rollback room)."""
    return k if schedule == "constant" else MAX_DRAFT_TOKENS
