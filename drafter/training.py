"""Distilling an MTP drafter from its frozen target, with exactly the inputs the speculative loop gives it.

Used by `scripts/train_drafter.py` (any Gemma 4 target) and `scripts/train_tiny.py` (the bundled pair).

What the loop feeds a draft round that starts at position p (speculative/loop.py, `draft`): the last token x_p,
embedded by the *target* (`target.embed`); the target's post-norm hidden state h_{p-1}; the target's K/V of the
accepted positions < p (the cache's clean view); and the constant RoPE position p for every chained step. Step
j > 1 reads the drafter's own hidden state and its own previous draft. `teacher_inputs` computes, under no_grad,
the target's hidden states and K/V of whole sequences once; `draft_steps` then runs the drafter at every position
of those sequences at once (position p's query sees keys < p, as a round at p would), K chained steps deep.

Step j's teacher is the target's distribution at position p + j - 1. It was computed after the sequence's own
tokens x_{p+1..p+j-1}, which are what a round would have drafted only where they are the target's greedy path;
so step j counts only there (always, on the target's own greedy continuations). Step j > 1 is fed the greedy
token g_{p+j-2}: a round only reaches step j while its drafts equal the greedy path, so conditioned on reaching it
that is exactly its input.

The loss is KL(target || drafter) per step over the full distribution (not cross-entropy against the target's
argmax): greedy acceptance needs the argmax to agree, and the whole distribution gives a denser signal for it; under
sampling a draft is accepted with probability sum_x min(p, q) = 1 - TV(p, q), which KL bounds (Pinsker). A
centroid-masked head (E2B/E4B drafters) gives -inf outside its selected clusters, where KL is undefined; it is
trained on its dense logits (the same token scores without the mask) plus KL between the target's probability
mass per cluster and the centroid scores, so the clusters it selects are those holding the target's choice.

Evaluation replays the loop: `accepted_lengths` gives, for a round starting at every position of the target's
greedy continuations of held-out prompts, how many drafts greedy verification would accept; `simulated_rounds`
walks them as the loop does (a round at p accepting a is followed by one at p + a + 1), so its rounds, acceptance
per draft position and tokens per target pass (`round_statistics`) are the loop's own on those prompts. With
measured step costs the predicted speed-up of N drafts is tokens per pass over (N drafter steps + one verify of
N + 1 tokens) in units of a target decode step (`round_cost`). `teacher_forced_agreement` scores each draft step
against the target's argmax on documents, fed the documents' own tokens.
"""

from __future__ import annotations

import math

import torch

from gemma4 import FULL, SLIDING, Gemma4Config, Gemma4Model, KVView

from .model import Drafter


# ---- the teacher ------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_inputs(target: Gemma4Model, seqs: torch.Tensor, batch: int = 16, progress=None) -> dict:
    """What distillation reads from the frozen target, computed once per sequence [N, S]: its post-norm hidden
    states [N, S, H_t] (the teacher's logits are `target.head` of them) and, per attention type, the K/V of every
    position (the cache's views after a prefill with room for all S positions, so position p sits at index p).
    `progress(rows done, rows)` is called after every batch of rows."""
    seqs = seqs.to(target.device)
    N, S = seqs.shape
    expected = torch.arange(S, device=target.device)
    hidden, kv = [], {}
    for i in range(0, N, batch):
        cache = target.new_cache(batch_size=len(seqs[i : i + batch]), max_length=S, max_rollback=0,
                                 min_sliding_history=S)
        hidden.append(target(seqs[i : i + batch], cache).hidden_states)  # every row: logits_to_keep would cut it
        for kind, view in cache.views().items():  # a sliding ring may have more slots than S: the rest are empty
            assert bool((view.positions[..., :S] == expected).all()), "every position must sit at its own index"
            kv.setdefault(kind, []).append((view.k[:, :, :S].clone(), view.v[:, :, :S].clone()))  # [b, n_kv, S, d]
        if progress is not None:
            progress(min(i + batch, N), N)
    kv = {kind: (torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])) for kind, parts in kv.items()}
    return {"ids": seqs, "hidden": torch.cat(hidden), "kv": kv}


def rows_of(data: dict, rows: torch.Tensor) -> dict:
    """Some rows of a `teacher_inputs` result (other per-row entries, e.g. "first", follow)."""
    out = {key: value[rows] for key, value in data.items() if key != "kv"}
    out["kv"] = {kind: (k[rows], v[rows]) for kind, (k, v) in data["kv"].items()}
    return out


def join(a: dict, b: dict) -> dict:
    """The rows of two `teacher_inputs` results, in one."""
    out = {key: torch.cat([a[key], b[key]]) for key in a if key != "kv"}
    out["kv"] = {kind: (torch.cat([k, b["kv"][kind][0]]), torch.cat([v, b["kv"][kind][1]]))
                 for kind, (k, v) in a["kv"].items()}
    return out


def shift(x: torch.Tensor, s: int, fill=0) -> torch.Tensor:
    """x[:, p + s] at row p (dim 1), `fill` past the end."""
    if s == 0:
        return x
    pad = x.new_full((x.shape[0], s, *x.shape[2:]), fill)
    return torch.cat([x[:, s:], pad], dim=1)


@torch.inference_mode()
def greedy_sequences(target: Gemma4Model, files: list[torch.Tensor], count: int, length: int, generator,
                     batch: int = 64, min_prompt: int = 16, progress=None, prompt_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """([count, length] sequences, [count] positions of the prompts' last tokens): a prompt continued by the
    target's greedy decoding, as the loop would. By default half the batches prompt with the start of a file, half
    with a random window of one, min_prompt..length/2 tokens (the same within a batch); with `prompt_len`, every
    prompt is a random window of that many tokens (held-out prompts cut from held-out documents). Files too short
    for a batch's prompt are skipped; fewer rows come back if no file is long enough. `progress(done, total)`, if
    given, is called after every decode step with the rows' worth of work done so far (fractional within a batch)
    out of `count`."""
    rows, firsts = [], []
    min_prompt = max(2, min(min_prompt, length // 2))
    batches = math.ceil(count / batch)
    for b in range(batches):
        n = min(batch, count - b * batch)
        plen = prompt_len or int(torch.randint(min_prompt, length // 2 + 1, (1,), generator=generator))
        picks = torch.randint(0, len(files), (4 * n,), generator=generator).tolist()
        long_enough = [files[i] for i in picks if len(files[i]) > plen + 1][:n]
        if not long_enough:
            continue
        prompts = []
        for f in long_enough:
            at_start = b % 2 == 0 and prompt_len is None
            offset = 0 if at_start else int(torch.randint(0, len(f) - plen, (1,), generator=generator))
            prompts.append(f[offset : offset + plen])
        ids = torch.stack(prompts).to(target.device)  # [n, plen]
        cache = target.new_cache(batch_size=len(prompts), max_length=length, max_rollback=0)
        logits = target(ids, cache, logits_to_keep=1).logits
        out = [ids]
        for i in range(length - plen):
            token = logits[:, -1].argmax(-1, keepdim=True)  # [n, 1]
            out.append(token)
            if progress is not None:
                progress(b * batch + n * (i + 1) / (length - plen), count)
            if cache.length == length - 1:
                break
            logits = target(token, cache).logits
        rows.append(torch.cat(out, dim=1).cpu())
        firsts.append(torch.full((len(prompts),), plen - 1))
        if progress is not None:
            progress(min(count, (b + 1) * batch), count)
    if not rows:
        raise ValueError(f"no document is longer than {min_prompt + 1} tokens: none can prompt a greedy continuation")
    return torch.cat(rows), torch.cat(firsts)


# ---- chained draft steps at every position ------------------------------------------------------------------------
def draft_steps(drafter: Drafter, target: Gemma4Model, batch: dict, steps: int, follow_path: bool = True):
    """Yield, for j = 1..steps, what step j of a round at every position p = 1..S-1 of the batch computes:
    (j, DraftOutput [B, S-1, ...], normed [B, S-1, H_a] (the drafter's final-norm output: the centroid head's
    input) or None, teacher log-probabilities [B, S-1, V] (the target at p + j - 1), valid [B, S-1] (the step
    counts here: inside the sequence and on the greedy path), greedy teacher tokens [B, S-1]).
    Gradients flow through the drafter only; the teacher side is computed under no_grad. `follow_path=False`
    (teacher forcing on documents): step j > 1 is fed the document's token x_{p+j-1} instead of the greedy one and
    counts at every position with room for it, its teacher the target given the document's own tokens."""
    ids, target_hidden = batch["ids"], batch["hidden"]
    B, S = ids.shape
    dtype, device = drafter.pre_projection.weight.dtype, drafter.pre_projection.weight.device
    with torch.no_grad():
        teacher = torch.log_softmax(target.head(target_hidden).float(), dim=-1)  # [B, S, V], as target(ids).logits
        greedy = teacher.argmax(-1)  # [B, S]: g_p, the target's token after position p
        # on_path[b, p]: x_{p+1} == g_p (the last position has no successor)
        on_path = torch.cat([ids[:, 1:] == greedy[:, :-1], greedy.new_zeros(B, 1, dtype=torch.bool)], 1)
        data_emb = target.embed(ids).to(device, dtype)  # [B, S, H_t]
        token_emb = data_emb[:, 1:]  # [B, S-1, H_t]: x_p for p >= 1
        greedy_emb = target.embed(greedy).to(device, dtype) if follow_path else None  # [B, S, H_t]
    views = {kind: KVView(k.to(device, dtype), v.to(device, dtype), torch.arange(S, device=device))
             for kind, (k, v) in batch["kv"].items()}
    hidden = target_hidden[:, :-1].to(device, dtype)  # [B, S-1, H_t]: h_{p-1} for p >= 1
    positions = torch.arange(1, S, device=device)  # query p = 1..S-1; p = 0 would see no K/V at all
    valid = torch.ones(B, S - 1, dtype=torch.bool, device=device)
    if "first" in batch:  # rows whose rounds start only after their prompt (greedy continuations under evaluation)
        valid &= positions[None, :] >= batch["first"].to(device)[:, None]
    context = drafter.context(positions, views)  # the same for every step: a round's position is constant
    captured = {}
    hook = None
    if drafter.config.use_ordered_embeddings:
        hook = drafter.model.norm.register_forward_hook(lambda m, i, out: captured.__setitem__("h", out))
    try:
        for j in range(1, steps + 1):
            step = drafter(torch.cat([token_emb, hidden], dim=-1), positions, views, context)  # logits [B, S-1, V]
            valid = valid & (positions + j - 1 < S)
            yield (j, step, captured.pop("h", None), shift(teacher, j - 1)[:, 1:].to(device), valid,
                   shift(greedy, j - 1)[:, 1:].to(device))
            hidden = step.hidden  # [B, S-1, H_t]
            token_emb = shift(greedy_emb, j - 1)[:, 1:] if follow_path else shift(data_emb, j)[:, 1:]  # g_{p+j-1}
            if follow_path:
                valid = valid & shift(on_path, j - 1)[:, 1:].to(device)  # step j+1's teacher saw x_{p+j} == g_{p+j-1}
    finally:
        if hook is not None:
            hook.remove()


def dense_logits(drafter: Drafter, normed: torch.Tensor) -> torch.Tensor:
    """Every token's score from the final-norm output [..., H_a], without a centroid mask: [..., V]."""
    weight = drafter.model.embed_tokens.weight if drafter.config.tie_word_embeddings else drafter.lm_head.weight
    return normed @ weight.T


def cluster_of_tokens(drafter: Drafter) -> torch.Tensor:
    """[V] the centroid cluster of each token id (the inverse of `token_ordering`, which lists each cluster's ids)."""
    ordering = drafter.masked_embedding.token_ordering  # [V]: cluster c holds ordering[c * V/C : (c + 1) * V/C]
    per = ordering.numel() // drafter.config.num_centroids
    cluster = torch.empty_like(ordering)
    cluster[ordering] = torch.arange(ordering.numel(), device=ordering.device) // per
    return cluster


def kl(t: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || drafter) over rows, from log-probabilities [N, V] (a zero-probability target term adds 0)."""
    p = t.exp()
    return torch.where(p > 0, p * (t - logq), 0.0).sum(-1).mean()


def drafter_loss(drafter: Drafter, target: Gemma4Model, batch: dict, steps: int, loss: str = "kl"):
    """Distillation loss of `steps` chained draft steps at every position of a batch of sequences at once
    (`teacher_inputs` rows: ids [B, S], the target's hidden states and K/V): the sum over steps of each step's
    mean KL(target || drafter) ("kl") or cross-entropy against the target's argmax ("argmax"), over the positions
    where that step counts (module docstring). Returns (loss, per-step [agreement with the target's argmax,
    positions counted])."""
    total, stats = 0.0, []
    cluster = cluster_of_tokens(drafter) if drafter.config.use_ordered_embeddings else None
    for _, step, normed, t, valid, greedy in draft_steps(drafter, target, batch, steps):
        t, g = t[valid], greedy[valid]  # [N, V], [N]
        logits = step.logits[valid].float() if normed is None else dense_logits(drafter, normed[valid]).float()
        logq = torch.log_softmax(logits, dim=-1)  # [N, V]
        if len(t) == 0:
            stats.append([0.0, 0])
            continue
        total = total + (kl(t, logq) if loss == "kl" else -logq.gather(1, g[:, None]).mean())
        if cluster is not None:  # the centroid scorer: the target's probability mass per cluster
            scores = torch.log_softmax(drafter.masked_embedding.centroids(normed[valid]).float(), dim=-1)  # [N, C]
            mass = torch.zeros_like(scores).index_add_(1, cluster, t.exp())  # [N, C]
            total = total + kl(mass.clamp_min(0).log(), scores)
        drafted = step.logits[valid].argmax(-1)  # what the loop would draft (masked head: among selected clusters)
        stats.append([(drafted == g).float().sum().item(), int(valid.sum())])
    return total, stats


@torch.no_grad()
def drafter_agreement(drafter: Drafter, target: Gemma4Model, data: dict, steps: int, batch: int = 8) -> list[float]:
    """Per draft step: how often the drafter's argmax equals the target's, where the step would be reached
    (conditional on the steps before it having been accepted)."""
    counts = [[0.0, 0] for _ in range(steps)]
    for i in range(0, len(data["ids"]), batch):
        _, stats = drafter_loss(drafter, target, rows_of(data, torch.arange(i, min(i + batch, len(data["ids"])))),
                                steps)
        for c, (a, n) in zip(counts, stats):
            c[0] += a
            c[1] += n
    return [a / max(n, 1) for a, n in counts]


def document_windows(files: list[torch.Tensor], count: int, length: int) -> torch.Tensor:
    """Up to `count` [length] windows of the documents end to end, one after another from the start (no overlap,
    no randomness: every evaluation reads the same tokens): [n, length]."""
    stream = torch.cat(files)
    n = min(count, len(stream) // length)
    if n == 0:
        raise ValueError(f"the held-out documents hold {len(stream)} tokens, fewer than one window of {length}")
    return stream[: n * length].view(n, length)


@torch.no_grad()
def accepted_lengths(drafter: Drafter, target: Gemma4Model, data: dict, steps: int, batch: int = 8,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a round starting at every position p = 1..S-1 of every row: how many of its `steps` drafts would be
    accepted under greedy decoding (the leading drafts equal to the target's greedy tokens), and which (row,
    position, step) counts (`draft_steps`'s valid masks): ([N, S-1] long, [steps, N, S-1] bool), column p - 1 for
    position p. `progress(rows done, rows)` is called after every batch of rows."""
    lengths, valids = [], []
    for i in range(0, len(data["ids"]), batch):
        part = rows_of(data, torch.arange(i, min(i + batch, len(data["ids"]))))
        accepted, length, valid_j = None, None, []
        for j, step, _, _, valid, greedy in draft_steps(drafter, target, part, steps):
            match = step.logits.argmax(-1) == greedy  # [B, S-1]
            accepted = match if accepted is None else accepted & match
            length = accepted.long() if length is None else length + accepted.long()
            valid_j.append(valid)
        lengths.append(length.cpu())
        valids.append(torch.stack(valid_j).cpu())
        if progress is not None:
            progress(min(i + batch, len(data["ids"])), len(data["ids"]))
    return torch.cat(lengths), torch.cat(valids, dim=1)


@torch.no_grad()
def teacher_forced_agreement(drafter: Drafter, target: Gemma4Model, data: dict, steps: int, batch: int = 8,
                             progress=None) -> list[float]:
    """On documents (teacher forcing): for draft step j = 1..steps, at every position p with p + j - 1 inside the
    sequence, the share at which step j's draft (fed the document's tokens) equals the target's argmax after the
    document's tokens up to p + j - 1. `progress(rows done, rows)` after every batch of rows."""
    hits, counts = [0] * steps, [0] * steps
    for i in range(0, len(data["ids"]), batch):
        part = rows_of(data, torch.arange(i, min(i + batch, len(data["ids"]))))
        for j, step, _, _, valid, greedy in draft_steps(drafter, target, part, steps, follow_path=False):
            hits[j - 1] += int(((step.logits.argmax(-1) == greedy) & valid).sum())
            counts[j - 1] += int(valid.sum())
        if progress is not None:
            progress(min(i + batch, len(data["ids"])), len(data["ids"]))
    return [h / c if c else float("nan") for h, c in zip(hits, counts)]


def simulated_rounds(lengths: torch.Tensor, prompt_lens: torch.Tensor, max_new_tokens: int, n: int
                     ) -> tuple[list[tuple[int, int]], int]:
    """The rounds of greedy speculative decoding (speculative/loop.py) with `n` drafts per round, replayed from
    `accepted_lengths` ([N, S-1], column p - 1 for a round at position p) of the target's greedy continuations of
    prompts of `prompt_lens` tokens: ([(drafted, accepted)] per round, as `GenerationStats.rounds`; the number of
    decode passes, those rounds and the one-token decodes where no draft fits the budget). As the loop: the prefill
    gives the first new token (at position prompt_len), so the first round starts there; a round at p drafts
    k = min(n, tokens left - 1) and one that accepts a is followed by one at p + a + 1 (a drafts + the target's
    own token), until `max_new_tokens` tokens are out. These are the loop's rounds on those prompts as long as its
    verify logits pick the same argmax as the teacher's prefill (near-ties within rounding may differ)."""
    rounds, passes = [], 0
    for row, plen in zip(lengths.tolist(), prompt_lens.tolist()):
        p, out = plen, 1
        while out < max_new_tokens:
            k = min(n, max_new_tokens - out - 1)
            a = min(row[p - 1], k)
            if k > 0:
                rounds.append((k, a))
            passes += 1
            p, out = p + a + 1, out + a + 1
    return rounds, passes


def round_statistics(rounds: list[tuple[int, int]], passes: int, n: int) -> dict:
    """Of (drafted, accepted) rounds and the decode passes they took: acceptance at draft position j = 1..n (of the
    rounds that drafted >= j, the share that accepted >= j) and tokens per target pass (each pass emits its accepted
    drafts and one token of its own), as `GenerationStats` counts them."""
    per = []
    for j in range(1, n + 1):
        drafted = [a for d, a in rounds if d >= j]
        per.append(sum(a >= j for a in drafted) / len(drafted) if drafted else float("nan"))
    return {"rounds": len(rounds), "acceptance_per_position": per,
            "tokens_per_pass": (passes + sum(a for _, a in rounds)) / max(1, passes)}


# ---- the model of speed ----------------------------------------------------------------------------------------
def expected_tokens(acceptance: list[float], n: int) -> float:
    """E[tokens per round] with n drafts: the bonus token plus, for each j <= n, P(at least j accepted) = A_j."""
    return 1.0 + sum(a for a in acceptance[:n] if not math.isnan(a))


def round_cost(n: int, drafter_cost: float, verify_cost: dict[int, float] | None = None) -> float:
    """A round of n drafts in units of one target decode step: n drafter steps (`drafter_cost` each) and one verify
    pass over n + 1 tokens (`verify_cost[n]`, 1 if unknown)."""
    return n * drafter_cost + (verify_cost or {}).get(n, 1.0)


def predicted_speedups(acceptance: list[float], drafter_cost: float, verify_cost: dict[int, float] | None = None
                       ) -> dict[int, float]:
    """Predicted speed-up over target-only decoding for n = 1..len(acceptance) drafts per round: E[tokens per round]
    over the round's cost, n drafter steps plus one verify pass over n + 1 tokens, in units of one target decode
    step (`drafter_cost`: a drafter step's cost in those units; `verify_cost[n]`: the verify pass's, 1 if unknown)."""
    return {n: expected_tokens(acceptance, n) / round_cost(n, drafter_cost, verify_cost)
            for n in range(1, len(acceptance) + 1)}


# ---- a drafter from scratch ----------------------------------------------------------------------------------
WIDTH_PER_QUERY_HEAD = 64  # the released drafters' ratio: hidden 256 -> 4 query heads (E2B, E4B), 1024 -> 16 (26B-A4B)


def scratch_heads(target: Gemma4Config, size: int) -> int:
    """Query heads of a scratch drafter of hidden size `size` for `target`: size // 64 (at least 1), rounded up to
    a multiple of the KV-head count of every attention type the drafter reads, at most the target's own head count.

    The drafter attends to the target's K/V with grouped-query attention, so each of its layers needs a head count
    that the K/V it reads divides: a multiple of the least common multiple of the target's KV heads per type (E2B 1,
    E4B 2, 31B lcm(16, 4) = 16, 26B-A4B lcm(8, 2) = 8). The target's own head count is such a multiple (its layers
    read the same K/V), so the cap keeps the rule. Every size >= 1 thus gets a valid layout: at 256, 4 heads for E2B
    and E4B, 16 for 31B, 8 for 26B-A4B."""
    if size < 1:
        raise ValueError(f"a drafter's hidden size must be at least 1, got {size}")
    kv = math.lcm(*(target.layers[target.export_layer[t]].num_kv_heads for t in scratch_attention_types(target)))
    return min(target.num_attention_heads, kv * math.ceil(max(1, size // WIDTH_PER_QUERY_HEAD) / kv))


def scratch_attention_types(target: Gemma4Config) -> list[str]:
    """The attention types whose K/V the target exports, sliding first."""
    return [t for t in (SLIDING, FULL) if t in target.export_layer]


def scratch_config(target: Gemma4Config, size: int, target_raw: dict | None = None) -> dict:
    """A gemma4_assistant config.json for `target` (its parsed config alone: no weights needed), the released
    drafters' design: 4 query-only layers (3 sliding + 1 full where the target has both), hidden `size`, MLP 8x
    wider, `scratch_heads` query heads, the head dims, KV heads, RoPE and window of the target's exporting layers,
    a tied head (a centroid-masked head needs a token clustering: fine-tune a released drafter for one).
    `target_raw`: the target's config.json text config, whose rope_parameters and token ids are copied."""
    types = scratch_attention_types(target)
    layer_types = [SLIDING] * 3 + [FULL] if len(types) == 2 else types * 4
    spec = {t: target.layers[target.export_layer[t]] for t in types}
    text = dict(model_type="gemma4_text", vocab_size=target.vocab_size, hidden_size=size,
                intermediate_size=8 * size, num_hidden_layers=4, num_attention_heads=scratch_heads(target, size),
                num_key_value_heads=spec[types[0]].num_kv_heads, head_dim=spec[types[0]].head_dim,
                global_head_dim=spec[FULL].head_dim if FULL in spec else target.global_head_dim,
                layer_types=layer_types, sliding_window=target.sliding_window, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, num_kv_shared_layers=4,
                max_position_embeddings=target.max_position_embeddings, attention_k_eq_v=target.attention_k_eq_v,
                enable_moe_block=False, use_double_wide_mlp=False, hidden_activation="gelu_pytorch_tanh",
                rms_norm_eps=target.rms_norm_eps, tie_word_embeddings=True, attention_bias=False)
    if FULL in spec:  # the full layers' KV heads, whatever the target calls them
        if target.attention_k_eq_v:
            text["num_global_key_value_heads"] = spec[FULL].num_kv_heads
        elif spec[FULL].num_kv_heads != text["num_key_value_heads"]:
            raise ValueError(f"the target's full layers have {spec[FULL].num_kv_heads} KV heads and its sliding "
                             f"layers {text['num_key_value_heads']}: a drafter config cannot say so without k_eq_v")
    for key in ("rope_parameters", "pad_token_id", "eos_token_id", "bos_token_id"):  # as the target's config.json
        if key in (target_raw or {}):
            text[key] = target_raw[key]
    return {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant",
            "backbone_hidden_size": target.hidden_size, "use_ordered_embeddings": False, "num_centroids": 2048,
            "centroid_intermediate_top_k": 32, "tie_word_embeddings": True, "text_config": text}


# ---- optimisation helpers ---------------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """transformers' Gemma init: matrices and tables ~ N(0, std); norms and layer scalars stay 1."""
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) * std)


@torch.no_grad()
def warm_start(drafter: Drafter, target: Gemma4Model) -> None:
    """Start the drafter's tied head from the target's embedding table and its post-projection at the identity
    (where the widths are equal), so its first outputs already live in the target's hidden space."""
    if drafter.model.embed_tokens.weight.shape == target.embed_tokens.weight.shape:
        drafter.model.embed_tokens.weight.copy_(target.embed_tokens.weight)
    if drafter.post_projection.weight.shape[0] == drafter.post_projection.weight.shape[1]:
        drafter.post_projection.weight.copy_(torch.eye(drafter.post_projection.weight.shape[0]))


@torch.no_grad()
def round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the floating weights to `dtype` in place (the storage dtype is kept): the model becomes the one that
    ships in `dtype`."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(dtype).to(t.dtype))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state as (tensors for safetensors, JSON-ready rest): no pickle."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, entry in state["state"].items() for name, value in entry.items()}
    return tensors, {"param_groups": state["param_groups"], "indices": sorted(state["state"])}


def optimizer_from_safetensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `optimizer_to_safetensors` saved."""
    state = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
