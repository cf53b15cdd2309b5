#!/usr/bin/env python
"""The loop itself before and after a train_drafter.py run: speculative.generate on held-out prompts.

    python scripts/loop_before_after.py --run OUT [--prompts 32] [--new-tokens 32] [--seed 1000]

OUT is a finished (or interrupted) train_drafter.py output folder. Its training_report.json (or, for a run still
going, checkpoint/state.json) gives the target, the initial drafter, the data and the held-out split; the drafter
after training is OUT's (or, without it, checkpoint/best.safetensors: the best evaluation so far), and N is the
output's `num_assistant_tokens`. The prompts are cut from the run's held-out documents with their own seed, so they
are not the prompts the run's evaluation chose its output on (a choice among many evaluations favours the prompts
it was made on). Greedy, a constant N, target-only decoding beside: acceptance per draft position and tokens per
target pass of each drafter, and whether every output equals target-only decoding. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from drafter.training import greedy_sequences  # noqa: E402
from train_drafter import is_held_out, load_chat_template, loop_check, read_documents, tokenize  # noqa: E402
from weights import load_drafter, load_target, load_tokenizer  # noqa: E402


def run_record(out: Path) -> tuple[dict, int, bool]:
    """(settings, N, finished): from training_report.json, else from checkpoint/state.json's best evaluation."""
    report = out / "training_report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        return r["settings"], r["num_assistant_tokens"], True
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    best = next(e for e in state["evals"] if e["step"] == state["best"]["step"])
    return state["settings"], best["num_assistant_tokens"], False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a train_drafter.py --out folder")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the prompts' cuts (default 1000)")
    p.add_argument("--n", type=int, help="drafts per round (default: the output's num_assistant_tokens)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s, n, finished = run_record(args.run)
    n = args.n or n
    target = load_target(s["target"], dtype=s["dtype"], device=s["device"])
    docs = read_documents(s["data"], load_chat_template(target.checkpoint_dir))
    held = tokenize([d for d in docs if is_held_out(d["text"], s["held_out"])], load_tokenizer(target.checkpoint_dir))
    ids, first = greedy_sequences(target, held, args.prompts, s["eval_prompt_len"] + 1,
                                  torch.Generator().manual_seed(args.seed), prompt_len=s["eval_prompt_len"])
    prompts = [row[: int(f) + 1].tolist() for row, f in zip(ids, first)]
    before = load_drafter(s["init"], target=target, device=target.device)
    if finished:
        after = load_drafter(args.run, target=target, device=target.device)
    else:  # the best evaluation so far, as the run would save it
        after = load_drafter(s["init"], target=target, dtype=torch.float32, device=target.device)
        after.load_state_dict(load_file(str(args.run / "checkpoint" / "best.safetensors")))
    result = loop_check(target, {"before": before, "after": after}, prompts, n, args.new_tokens)
    print(json.dumps({"run": str(args.run), "finished": finished, "seed": args.seed, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
