"""One prompt of the bundled pair, round by round: what goes into each phase of speculative decoding and what comes out.

    python scripts/walkthrough.py                      # greedy, 4 drafts per round, 4 rounds
    python scripts/walkthrough.py --rounds 6 --num-draft-tokens 6 --prompt "def add(a, b):"

It drives the library's own phase functions of `speculative/loop.py` (`prefill`, `draft`, `verify`, `accept`,
`commit`) in the order `speculative.generate` calls them, and prints their inputs and outputs: shapes, the drafted
tokens as text, the target's choice at every verify row, what is accepted, and the cache length before and after the
rollback. `tests/test_walkthrough.py` checks that its tokens equal `speculative.generate`'s on the same prompt.
Offline, a few seconds on a CPU. docs/loop.md explains each phase.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from speculative.loop import accept, commit, cut, draft, new_generator, prefill, verify  # noqa: E402
from speculative.options import stop_tokens  # noqa: E402
from speculative.sampling import Sampler  # noqa: E402
from weights import load_drafter, load_target, load_tokenizer  # noqa: E402

from cli_common import Parser, UserError, check_generation_options, closed_stdout, one_line  # noqa: E402

TARGET, DRAFTER = ROOT / "tiny_gemma4" / "target", ROOT / "tiny_gemma4" / "drafter"
PROMPT = 'class Stack:\n    """A last-in, first-out container."""\n\n    def push(self, item):\n'


def shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def show(tokenizer, ids: list[int]) -> str:
    """Each token as its own quoted piece of text: ['self', '.', '_items']."""
    return "[" + ", ".join(repr(tokenizer.decode([i])) for i in ids) + "]"


def new_cache(target, drafter, prompt_len: int, max_new_tokens: int, k: int):
    """The cache `speculative.generate` builds for a constant schedule of k drafts per round."""
    k_max = min(k, max_new_tokens - 1)
    return target.new_cache(batch_size=1, max_length=prompt_len + max_new_tokens + k_max + 2,
                            max_rollback=k_max + 1, min_sliding_history=drafter.sliding_history)


def walkthrough(target, drafter, tokenizer, prompt_text: str = PROMPT, *, rounds: int = 4, num_draft_tokens: int = 4,
                temperature: float = 0.0, seed: int = 0, out=print) -> list[int]:
    """Run a prefill and up to `rounds` rounds, printing each phase with `out`. Returns the new tokens, which are
    those of `speculative.generate(target, drafter, prompt, max_new_tokens=len(result), num_draft_tokens=...)`."""
    prompt = tokenizer.encode(prompt_text, add_bos=True)
    k = num_draft_tokens
    budget = 1 + rounds * (k + 1)  # room for every round to accept all its drafts and a bonus
    stops = stop_tokens(target, None)
    sampler = Sampler(float(temperature))
    generator = new_generator(target.device, seed)
    cache = new_cache(target, drafter, len(prompt), budget, k)
    mode = "greedy" if sampler.greedy else f"sampling, temperature {temperature}, seed {seed}"
    out(f"prompt: {len(prompt)} tokens ({mode}, {k} drafts per round)")
    out(prompt_text.rstrip("\n"))
    out("(accept marks: + accepted, - the first rejected draft, . drafts after it, never judged)")

    out("\n== prefill: the whole prompt in one target forward, logits for its last row only")
    out(f"  in : input_ids [1, {len(prompt)}] at positions 0..{len(prompt) - 1}, cache length {cache.length}")
    token, h, _ = prefill(target, cache, prompt, sampler, generator)
    new = [int(token)]
    out(f"  out: token {show(tokenizer, new)} (its logits row [1, {target.config.vocab_size}]), hidden state h "
        f"{shape(h)} of position {len(prompt) - 1}, cache length {cache.length}")

    for r in range(1, rounds + 1):
        if new[-1] in stops:
            break
        L = len(prompt) + len(new)
        out(f"\n== round {r}: L = {L} tokens; the cache holds positions 0..{cache.length - 1}; `token` "
            f"{show(tokenizer, new[-1:])} is at position {L - 1}, not in the cache yet")

        views = cache.views()
        out(f"  draft  in : token [1, 1], h {shape(h)}, position {cache.length} for all {k} steps; the clean view:")
        for t, v in views.items():
            readable = v.positions[v.positions >= 0]
            out(f"               {t}: K, V {shape(v.k)}, {readable.numel()} readable slots, positions "
                f"{int(readable.min())}..{int(readable.max())}")
        drafts, q = draft(drafter, target, token, h, cache, k, sampler, generator)
        drafted = drafts[0].tolist()  # drafts: [1, k], one row
        q_note = f", q {shape(q)}" if q.numel() else ""
        out(f"  draft  out: drafts {shape(drafts)} {show(tokenizer, drafted)}{q_note}")

        before = cache.length
        logits, hidden = verify(target, cache, token, drafts)
        out(f"  verify in : [token, d_1..d_{k}] [1, {k + 1}] at positions {before}..{before + k}, "
            f"cache length {before}")
        out(f"  verify out: logits {shape(logits)}, hidden {shape(hidden)}, cache length {cache.length}")
        out(f"              target's argmax per row {show(tokenizer, logits[0].argmax(dim=-1).tolist())}")

        accepted, bonus = accept(sampler, logits, drafts, q, None, generator)  # [1] each: one per row
        n, bonus_id = int(accepted), int(bonus)
        marks = " ".join(("+" if j < n else "-" if j == n else ".") + repr(tokenizer.decode([d]))
                         for j, d in enumerate(drafted))
        out(f"  accept    : n = {n} of {k} ({marks}), bonus {show(tokenizer, [bonus_id])} from row {n}")

        emitted = cut(drafted[:n] + [bonus_id], stops, budget - len(new))
        token, h = commit(cache, hidden, bonus, [k - n], accepted)
        new += emitted
        out(f"  commit    : rollback({k - n}): cache length {before + k + 1} -> {cache.length}; h = hidden row {n} "
            f"{shape(h)}; emitted {show(tokenizer, emitted)}")

    out(f"\n{len(new)} new tokens:")
    out(tokenizer.decode(new))
    return new


def main(argv=None) -> int:
    """The command line, as scripts/generate.py's: a bad option or a walk past the target's positions is one line
    on stderr and exit status 2 (before anything is printed), a closed stdout (`| head`) ends it quietly."""
    try:
        return run(argv)
    except BrokenPipeError:
        return closed_stdout()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=PROMPT, help="the text to continue (default: the start of a Stack class)")
    p.add_argument("--rounds", type=int, default=4, help="speculative rounds after the prefill (default 4)")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="drafts per round (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: lossless sampling")
    p.add_argument("--seed", type=int, default=0, help="the random stream under sampling (default 0)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    k = args.num_draft_tokens
    check_generation_options(dict(num_draft_tokens=k, temperature=args.temperature, seed=args.seed,
                                  max_new_tokens=1, schedule="constant"))
    target = load_target(TARGET)
    drafter = load_drafter(DRAFTER, target=target, dtype=target.dtype)
    tokenizer = load_tokenizer(TARGET)
    check_positions(len(tokenizer.encode(args.prompt, add_bos=True)), args.rounds, k,
                    target.config.max_position_embeddings)
    with torch.inference_mode():
        walkthrough(target, drafter, tokenizer, args.prompt, rounds=args.rounds, num_draft_tokens=k,
                    temperature=args.temperature, seed=args.seed)
    sys.stdout.flush()  # here, where a closed pipe is still caught, not at the interpreter's exit
    return 0


def check_positions(prompt_len: int, rounds: int, k: int, limit: int) -> None:
    """The walk's budget (every round may accept all its drafts and a bonus) must fit the target's positions."""
    budget = 1 + rounds * (k + 1)
    if prompt_len + budget <= limit:
        return
    fits = (limit - prompt_len - 1) // (k + 1)
    hint = f"use --rounds {fits} or fewer" if fits >= 1 else "use a shorter --prompt"
    raise UserError(f"--rounds {rounds} with --num-draft-tokens {k} needs up to {budget} new positions after the "
                    f"prompt's {prompt_len} tokens, past the target's max_position_embeddings={limit}: {hint}")


if __name__ == "__main__":
    raise SystemExit(main())
