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
    """A draft under sampling: x ~ q ([1, V] -> [1]). The rejection rule's proof needs exactly this."""
    return sample(q, generator)


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification. logits: [k+1, V] target rows, drafts: [k].

    Returns (n, bonus) as 0-d tensors: n = length of the longest prefix with d_j == argmax(row j-1), bonus =
    argmax(row n) (the target's own token after the last accepted draft)."""
    choice = logits.argmax(dim=-1)  # [k+1]
    n = leading_true(drafts == choice[:-1])
    return n, choice[n.view(1)][0]  # index with a [1] tensor: a gather, no host sync


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023). p: [k+1, V] target probabilities,
    q: [k, V] drafter probabilities the drafts [k] were sampled from; row i of both is the distribution of draft i
    (0-based), row k of p the one after the last draft.

    Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); n = number of leading acceptances. The next token
    is drawn from normalize(max(0, p_n - q_n)) after a rejection (from p_n if that is all zero), and from p_k when
    all k drafts were accepted. Returns (n, token) as 0-d tensors; the emitted tokens are then distributed exactly
    as the target's p."""
    k = drafts.shape[0]
    rows = torch.arange(k, device=drafts.device)
    ratio = p[rows, drafts] / q[rows, drafts]  # [k]; q(d) > 0 since d was drawn from q
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)
    n = leading_true(u < ratio)
    at = n.view(1)  # index with a [1] tensor: a gather, no host sync
    q_padded = torch.cat([q, q.new_zeros(1, q.shape[-1])])  # [k+1, V]: row k is 0, so residual(k) = p_k
    residual = torch.clamp(p[at] - q_padded[at], min=0)  # [1, V]
    residual = torch.where(residual.sum() > 0, residual, p[at])  # all zero only if p_n == q_n (float rounding)
    return n, sample(residual, generator)[0]


def leading_true(flags: torch.Tensor) -> torch.Tensor:
    """[k] bool -> 0-d long: how many leading entries are True (0 for an empty tensor)."""
    return flags.long().cumprod(dim=0).sum()
