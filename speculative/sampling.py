"""Token choice for speculative decoding: logits processing, sampling, and the two acceptance rules.

Invariants:
- One processing, `Sampler.probs`: temperature, then top-k, then top-p (nucleus), each masking with -inf, then a
  float32 softmax. The loop applies it identically to the target's rows (p) and to the drafter's logits (q), so q is
  exactly the distribution drafts are drawn from.
- Under sampling (temperature > 0), drafts are *sampled* from q (`draft_token`), never argmaxed. The rejection rule
  `accept_sampled` is lossless only under that condition (docs/loop.md; transformers drafts by argmax and is biased).
- Greedy (temperature 0): every choice is an argmax; drafts are accepted while they equal the target's argmax, so the
  output is token for token the target-only greedy output. top-k / top-p cannot change an argmax and are ignored.
- Everything stays on the device; callers do one host sync per round on the small results.

Nothing here knows about models, caches or tokenizers: inputs are logits and probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    """The user's sampling options. `temperature == 0` means greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k and top-p."""
        x = logits.float() / self.temperature
        if self.top_k is not None:
            x = keep_top_k(x, self.top_k)
        if self.top_p is not None and self.top_p < 1.0:
            x = keep_top_p(x, self.top_p)
        return torch.softmax(x, dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """[N, V] logits -> [N] tokens: the argmax (greedy) or a draw from the processed distribution."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return sample(self.probs(logits), generator)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask every token below the k-th largest logit with -inf (ties at the k-th value are kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p (at least one token)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[N, V] (possibly unnormalised) non-negative weights -> [N] tokens."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def draft_token(q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A draft under sampling: x ~ q ([B, V] -> [B]). The rejection rule's proof needs exactly this."""
    return sample(q, generator)


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor,
                  caps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification. logits: [B, k+1, V] target rows, drafts: [B, k] (or [k+1, V] and [k] for one row).
    `caps` [B]: row b accepts at most caps[b] drafts (a batch drafts as many as its longest row needs; shorter
    rows ignore the rest).

    Returns (n, bonus), each [B] (0-d for one row): n = length of the longest prefix with d_j == argmax(row j-1),
    bonus = argmax(row n) (the target's own token after the last accepted draft)."""
    if drafts.dim() == 1:
        n, bonus = accept_greedy(logits[None], drafts[None], caps)
        return n[0], bonus[0]
    choice = logits.argmax(dim=-1)  # [B, k+1]
    n = leading_true(_capped(drafts == choice[:, :-1], caps))  # [B]
    return n, choice.gather(1, n[:, None])[:, 0]  # a gather, no host sync


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None,
    caps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023), each row on its own. p: [B, k+1, V]
    target probabilities, q: [B, k, V] drafter probabilities the drafts [B, k] were sampled from (or [k+1, V],
    [k, V], [k] for one row); row i of both is the distribution of draft i (0-based), row k of p the one after the
    last draft. `caps` [B]: row b verifies only its first caps[b] drafts, as if it had drafted no more.

    Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); n = number of leading acceptances. The next token
    is drawn from normalize(max(0, p_n - q_n)) after a rejection (from p_n if that is all zero), and from p_n when
    all of the row's drafts were accepted. Returns (n, token), each [B] (0-d for one row); each row's emitted tokens
    are then distributed exactly as its target's p."""
    if drafts.dim() == 1:
        n, token = accept_sampled(p[None], q[None], drafts[None], generator, caps)
        return n[0], token[0]
    B, k = drafts.shape
    V = p.shape[-1]
    at = drafts[..., None]  # [B, k, 1]
    ratio = (p[:, :k].gather(2, at) / q.gather(2, at))[..., 0]  # [B, k]; q(d) > 0 since d was drawn from q
    u = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    n = leading_true(_capped(u < ratio, caps))  # [B]
    row = n[:, None, None].expand(B, 1, V)
    p_n = p.gather(1, row)[:, 0]  # [B, V]
    q_n = torch.cat([q, q.new_zeros(B, 1, V)], dim=1).gather(1, row)[:, 0]  # row k of q is 0: residual(k) = p_k
    if caps is not None:  # a row that accepted all its caps[b] drafts draws from p_n, as after its last draft
        q_n = torch.where((n < caps)[:, None], q_n, 0.0)
    residual = torch.clamp(p_n - q_n, min=0)  # [B, V]
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # all zero only if p_n == q_n
    return n, sample(residual, generator)


def _capped(flags: torch.Tensor, caps: torch.Tensor | None) -> torch.Tensor:
    """[B, k] flags with every entry j >= caps[b] of row b set False."""
    if caps is None:
        return flags
    return flags & (torch.arange(flags.shape[1], device=flags.device) < caps[:, None])


def leading_true(flags: torch.Tensor) -> torch.Tensor:
    """[..., k] bool -> [...] long: how many leading entries are True (0 for an empty last axis)."""
    return flags.long().cumprod(dim=-1).sum(dim=-1)
