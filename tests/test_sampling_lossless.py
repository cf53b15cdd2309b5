"""Speculative sampling is lossless: the tokens it emits are distributed exactly as the target's own samples.

Oracles: the exact distribution computed from the target's logits (processed by transformers' temperature / top-k /
top-p warpers, an independent implementation), and a chi-square goodness-of-fit test on fixed seeds (deterministic).

Design of the end-to-end tests: a tiny target (vocab V = 8, our Gemma4Model, random weights) and a stub drafter
whose q is unrelated to the target's p. With max_new_tokens = 4 the first token comes from the prefill (plain
sampling) and the next two from speculative rounds, so the test looks at the joint law of (t2, t3), marginalised
exactly over t1: P(t2 = b, t3 = c) = sum_a p(a) p(b | a) p(c | a, b) (64 cells). With k = 1 that covers accepted
drafts, residual draws after a rejection, the bonus token after a full acceptance and a round after a rejection
(rolled-back cache, new hidden state); with k = 2 a chain of two drafts. Cells with expected count < 5 are pooled.
A good implementation must give p-value > 1e-3 (N = 800 runs, seeds 0..N-1; 500 with temperature 2, top-k 4,
top-p 0.85 and a drafter whose top-k set misses tokens p allows); the same machinery must reject (p < 1e-6, with
only 300 runs) transformers' biased variant, argmax drafts + the rejection test (docs/transformers.md), injected by
monkeypatching so the library has no broken mode. A bias too small for these sample sizes (q taken from raw drafter
logits) is checked directly on `draft`'s output.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import speculative.sampling as sampling
from gemma4 import FULL, SLIDING, Gemma4Config, Gemma4Model
from speculative import generate
from speculative.sampling import Sampler, accept_sampled
from tests import tiny

V = 8
PROMPT = [1, 2, 3, 4, 5]
N_RUNS = 800
GOOD_P = 1e-3  # a correct sampler fails this with probability 1e-3 (the seeds are fixed, so it never flakes)
BROKEN_P = 1e-6


def build_sampling_target() -> Gemma4Model:
    """A 2-layer target over V = 8 tokens (one sliding, one full layer)."""
    cfg = dict(tiny.DENSE31B_LIKE, vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
               layer_types=[SLIDING, FULL])
    torch.manual_seed(0)
    model = Gemma4Model(Gemma4Config(**cfg)).eval()
    tiny.randomize(model, seed=0)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(4.0)  # a spread-out but far from uniform next-token distribution
    return model


@pytest.fixture(scope="module")
def target() -> Gemma4Model:
    return build_sampling_target()


class TableDrafter:
    """A drafter whose logits come from a fixed random table indexed by (position, step, input token): a valid
    drafter with a q that has nothing to do with the target's p. `favour` adds a large logit to some tokens."""

    sliding_history = 9
    generation_config: dict = {}

    def __init__(self, seed: int = 1, favour: list[int] = ()):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(32, 8, V, V, generator=gen) * 1.5  # [position, step, token, V]
        self.table[..., list(favour)] += 4.0
        self._hidden, self._step = None, 0

    def context(self, position, views):  # the loop builds a round's context once; this drafter needs none
        return None

    def step(self, target, token, hidden, position, views, context=None):
        position = int(position)  # [1, 1]: one row
        self._step = self._step + 1 if hidden is self._hidden else 0  # a new round starts from the target's h
        self._hidden = torch.zeros(1, 1, target.config.hidden_size)
        logits = self.table[position, self._step, int(token)].view(1, 1, V)
        return SimpleNamespace(logits=logits, hidden=self._hidden)


def hf_probs(logits: torch.Tensor, temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """The processed distribution computed with transformers' warpers (the independent oracle)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    shape = logits.shape
    x = TemperatureLogitsWarper(temperature)(None, logits.double().reshape(-1, shape[-1]))  # warpers take [N, V]
    if top_k is not None:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p is not None:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.softmax(x, dim=-1).reshape(shape)


def exact_joint_t2_t3(target, **processing) -> torch.Tensor:
    """[V, V]: P(t2 = b, t3 = c) of target-only sampling, summed over the first token t1 = a."""
    a, b = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    prompt = torch.tensor(PROMPT).expand(V * V, -1)
    ids = torch.cat([prompt, a.reshape(-1, 1), b.reshape(-1, 1)], dim=1)  # [V*V, P+2]: prompt, a, b
    with torch.no_grad():
        logits = target(ids).logits  # [V*V, P+2, V]
    p = hf_probs(logits[:, -3:], **processing)  # rows: p(. | prompt), p(. | a), p(. | a, b)
    p1 = p[::V, 0, :][0]  # [V]
    p2 = p[::V, 1, :]  # [V (a), V (b)]
    p3 = p[:, 2, :].reshape(V, V, V)  # [a, b, c]
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def sample_t2_t3(target, drafter, n_runs: int, **options) -> tuple[torch.Tensor, int]:
    """[V, V] counts of (t2, t3) over seeds 0..n_runs-1, and how many drafts were accepted in all."""
    counts, accepted = torch.zeros(V, V, dtype=torch.long), 0
    for seed in range(n_runs):
        options = {"schedule": "constant", **options}
        out = generate(target, drafter, PROMPT, max_new_tokens=4, seed=seed, stop_token_ids=[], **options)
        counts[out.tokens[1], out.tokens[2]] += 1
        accepted += sum(a for _, a in out.stats.rounds)
    return counts, accepted


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of counts to probs. Cells with expected count < 5 are pooled; any count in a cell of
    probability 0 is an outright failure (p-value 0)."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - probs.double()).abs().sum())


# ---- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_matches_the_target_distribution(target, k):
    exact = exact_joint_t2_t3(target, temperature=1.0)
    counts, accepted = sample_t2_t3(target, TableDrafter(), N_RUNS, num_draft_tokens=k, temperature=1.0)
    assert 0.1 * N_RUNS < accepted  # both branches (accept, reject) are exercised
    p_value = chi_square_p_value(counts, exact)
    print(f"k={k}: chi-square p-value {p_value:.3g}, total variation {total_variation(counts, exact):.3f}")
    assert p_value > GOOD_P


def test_argmax_drafts_with_the_rejection_test_are_detected_as_biased(target, monkeypatch):
    """transformers' variant (docs/transformers.md): drafts by argmax of q, accepted with probability min(1, p/q)."""
    monkeypatch.setattr(sampling, "draft_token", lambda q, generator: q.argmax(dim=-1))
    exact = exact_joint_t2_t3(target, temperature=1.0)
    counts, _ = sample_t2_t3(target, TableDrafter(), 300, num_draft_tokens=1, temperature=1.0)
    p_value = chi_square_p_value(counts, exact)
    print(f"argmax drafts: chi-square p-value {p_value:.3g}, total variation {total_variation(counts, exact):.3f}")
    assert p_value < BROKEN_P


def test_temperature_top_k_top_p_are_applied_to_p_and_q_alike(target):
    """The drafter strongly favours tokens {0, 2, 6, 7}, so after top-k = 4 its q gives probability 0 to tokens
    the target's p allows. The output must still follow the target's processed distribution, never a masked token."""
    processing = dict(temperature=2.0, top_k=4, top_p=0.85)
    exact = exact_joint_t2_t3(target, **processing)
    assert exact[[1, 3, 4, 5]].sum() > 0.4  # much of t2's mass is on tokens the drafter never proposes
    assert (exact > 0).sum() < V * V  # top-k / top-p do mask cells
    counts, accepted = sample_t2_t3(target, TableDrafter(favour=[0, 2, 6, 7]), 500, num_draft_tokens=2,
                                    **processing)
    assert accepted > 30
    p_value = chi_square_p_value(counts, exact)
    print(f"T=2 top-k=4 top-p=0.85: chi-square p-value {p_value:.3g}, TV {total_variation(counts, exact):.3f}")
    assert p_value > GOOD_P


def test_draft_returns_the_processed_q_its_drafts_were_drawn_from(target):
    """The q used by the rejection test is the drafter's distribution after the same processing as p (transformers
    uses raw logits, docs/transformers.md), and every draft lies in its support. A subtle bias, so checked directly."""
    from speculative.loop import draft, prefill

    processing = dict(temperature=2.0, top_k=4, top_p=0.85)
    sampler, gen = Sampler(**processing), torch.Generator().manual_seed(0)
    cache = target.new_cache(max_length=16, max_rollback=4, min_sliding_history=9)
    token, h, _ = prefill(target, cache, PROMPT, sampler, gen)
    drafter = TableDrafter(favour=[0, 2, 6, 7])
    drafts, q = draft(drafter, target, token, h, cache, 3, sampler, gen)  # [1, 3], [1, 3, V]
    drafts, q = drafts[0], q[0]  # the one row
    inputs = [int(token)] + drafts[:-1].tolist()  # what each step read
    want = torch.stack([hf_probs(drafter.table[len(PROMPT), j, t], **processing) for j, t in enumerate(inputs)])
    torch.testing.assert_close(q, want.float(), atol=1e-6, rtol=1e-5)
    assert bool((q[torch.arange(3), drafts] > 0).all())


def test_same_seed_same_output_and_different_seeds_differ(target):
    def run(seed):
        r = generate(target, TableDrafter(), PROMPT, max_new_tokens=20, num_draft_tokens=3, temperature=1.0,
                     top_k=6, seed=seed, stop_token_ids=[], schedule="constant")
        return r.tokens, r.stats.rounds

    assert run(7) == run(7)
    assert len({tuple(run(seed)[0]) for seed in range(4)}) > 1


# ---- the pieces ----------------------------------------------------------------------------------------------------
def test_rejection_step_emits_p_and_argmax_drafts_do_not():
    """One draft, p = [.5, .3, .2], q = [.25, .45, .30] (docs/loop.md): sampled drafts give p; argmax drafts give
    [1/3, 2/3, 0] (accept token 1 with probability .3/.45, else the residual puts all mass on token 0)."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])  # [k+1, V]: row 1 is the bonus distribution
    q = torch.tensor([[0.25, 0.45, 0.30]])  # [k, V]
    gen = torch.Generator().manual_seed(0)
    n = 4000
    sampled, argmaxed = torch.zeros(3), torch.zeros(3)
    for _ in range(n):
        d = sampling.draft_token(q, gen)
        acc, tok = accept_sampled(p, q, d, gen)
        sampled[d if acc else tok] += 1
        d = q.argmax(-1)
        acc, tok = accept_sampled(p, q, d, gen)
        argmaxed[d if acc else tok] += 1
    assert chi_square_p_value(sampled, p[0]) > GOOD_P
    torch.testing.assert_close(argmaxed / n, torch.tensor([1 / 3, 2 / 3, 0.0]), atol=0.03, rtol=0)  # 4 standard errors


def test_accepted_draft_is_followed_by_the_bonus_row():
    """Drafts that p and q both force are accepted (ratio 1) and the next token comes from row k of p."""
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    n, tok = accept_sampled(p, q, torch.tensor([1]), torch.Generator().manual_seed(0))
    assert (int(n), int(tok)) == (1, 2)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.6, 5, None), (1.3, None, 0.7),
                                                      (0.8, 10, 0.5), (2.0, 1, None), (1.0, None, 0.01)])
def test_processing_equals_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    logits[0, :10] = float("-inf")  # a centroid-masked drafter row
    got = Sampler(temperature, top_k, top_p).probs(logits)
    want = hf_probs(logits, temperature, top_k, top_p).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got > 0, want > 0)  # the same kept set
