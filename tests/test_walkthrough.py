"""scripts/walkthrough.py drives the library's phase functions by hand; its tokens must be `speculative.generate`'s.

Oracle: `speculative.generate` on the same prompt and pair (the bundled tiny pair), greedy (which is also the
target-only output) and sampled with the same seed (same random stream, so the same draws)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from speculative import generate
from weights import load_drafter, load_target, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def walk():
    spec = importlib.util.spec_from_file_location("walkthrough", ROOT / "scripts" / "walkthrough.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = load_target(module.TARGET)
    return module, target, load_drafter(module.DRAFTER, target=target), load_tokenizer(module.TARGET)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_walkthrough_tokens_equal_generate(walk, temperature):
    module, target, drafter, tokenizer = walk
    lines = []
    with torch.inference_mode():
        tokens = module.walkthrough(target, drafter, tokenizer, rounds=4, num_draft_tokens=4,
                                    temperature=temperature, seed=3, out=lines.append)
    prompt = tokenizer.encode(module.PROMPT, add_bos=True)
    budget = 1 + 4 * (4 + 1)  # as the walkthrough sizes it: every round has room for all its drafts
    want = generate(target, drafter, prompt, max_new_tokens=budget, num_draft_tokens=4, temperature=temperature,
                    seed=3)
    assert tokens == want.tokens[: len(tokens)] and len(tokens) > 4
    accepted = [int(line.split("n = ")[1].split()[0]) for line in lines if "accept    :" in line]
    assert [(4, n) for n in accepted] == want.stats.rounds[: len(accepted)]
    if temperature == 0:  # greedy: exactly the target's own output
        assert tokens == generate(target, None, prompt, max_new_tokens=len(tokens)).tokens
        assert any(n < 4 for n in accepted) and any(n == 4 for n in accepted)  # a rollback and a full acceptance
    assert any("rollback(" in line for line in lines) and lines[-1] == tokenizer.decode(tokens)


def test_walkthrough_runs_as_a_script(capsys):
    spec = importlib.util.spec_from_file_location("walkthrough_main", ROOT / "scripts" / "walkthrough.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--rounds", "1", "--num-draft-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "== prefill" in out and "== round 1" in out and "verify out: logits [1, 3, 4096]" in out
