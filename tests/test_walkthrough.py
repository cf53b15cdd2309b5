"""scripts/walkthrough.py drives the library's phase functions by hand; its tokens must be `speculative.generate`'s.

Oracle: `speculative.generate` on the same prompt and pair (the bundled tiny pair), greedy (which is also the
target-only output) and sampled with the same seed (same random stream, so the same draws). Its command line
checks options as scripts/generate.py does (the library's checks: the messages name the option), prints the same
text in every process, and stops quietly when stdout's reader has gone."""

import importlib.util
import os
import subprocess
import sys
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
                    seed=3, schedule="constant")
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


def run_script(*argv, **env):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "walkthrough.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, **env))


LONG_PROMPT = " ".join(f"x{i}" for i in range(1500))  # past the bundled target's 2048 positions


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**64 - 1], got -1"),
    (["--num-draft-tokens", "33"], "--num-draft-tokens must be an integer in [1, 32], got 33"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--rounds", "500"], "--rounds 500 with --num-draft-tokens 4 needs up to 2501 new positions after the "
                          "prompt's 28 tokens, past the target's max_position_embeddings=2048: use --rounds 403 or "
                          "fewer"),
    (["--prompt", LONG_PROMPT], "past the target's max_position_embeddings=2048: use a shorter --prompt"),
])
def test_walkthrough_bad_options_are_one_line_errors(walk, argv, message, capsys):
    """The same checks as scripts/generate.py (the library's, naming the option), and the position limit: exit
    status 2, one line on stderr, nothing on stdout."""
    module = walk[0]
    try:
        code = module.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_walkthrough_output_is_the_same_in_every_process():
    """Two processes with different string hashes print the same walkthrough (the per-type K/V views come in the
    config's layer order, not a set's)."""
    runs = [run_script("--rounds", 1, "--num-draft-tokens", 2, PYTHONHASHSEED=seed) for seed in ("0", "1")]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


def test_walkthrough_into_a_closed_pipe_exits_quietly():
    """`walkthrough.py | head`: stdout closed before the first line; no traceback, no "Broken pipe" message, the
    status a shell gives a program that SIGPIPE ended (or 0)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "walkthrough.py"), "--rounds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) in (0, 141, -13)
    assert err == ""
