"""scripts/generate.py end to end on tiny checkpoints (with a tokenizer and chat template) built in the tests.

Oracles: the library call `speculative.generate` on the same prompt ids, target-only decoding, and the tokenizer +
chat template rendering checked against transformers in test_tokenizer.py."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from speculative import generate
from tests import tiny
from tests.test_tokenizer import GEMMA4_TEMPLATE, _train_tokenizer_json
from weights import load_drafter, load_target, load_tokenizer, render_chat

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """<root>/gemma and <root>/gemma-assistant (the default drafter name), with tokenizer files and a template."""
    root = tmp_path_factory.mktemp("cli")
    target = tiny.save(tiny.build_target("e2b"), root / "gemma")
    tiny.save(tiny.build_drafter("e2b"), root / "gemma-assistant")
    _train_tokenizer_json(target)
    (target / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    return target


def run(argv, capsys):
    try:
        code = generate_script.cli([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_greedy_json_equals_library_call_and_target_only(models, capsys):
    code, out, err = run(["--target", models, "--prompt", "Hello world", "--max-new-tokens", 24,
                          "--num-draft-tokens", 3, "--json"], capsys)
    assert code == 0, err
    report = last_json(out)
    target = load_target(models)
    drafter = load_drafter(str(models) + "-assistant", target=target)
    tokenizer = load_tokenizer(models)
    prompt = tokenizer.encode(render_chat(GEMMA4_TEMPLATE, [{"role": "user", "content": "Hello world"}]))
    library = generate(target, drafter, prompt, max_new_tokens=24, num_draft_tokens=3)
    baseline = generate(target, None, prompt, max_new_tokens=24)
    assert report["tokens"] == library.tokens == baseline.tokens
    assert report["text"] == tokenizer.decode(library.tokens, skip_special_tokens=True)
    stats = report["stats"]
    assert stats["rounds"] == [list(r) for r in library.stats.rounds]
    assert stats["target_forward_passes"] == library.stats.target_forward_passes
    assert stats["acceptance_rate"] == library.stats.acceptance_rate
    assert stats["tokens_per_second"] > 0


def test_streamed_text_equals_the_decoded_answer(models, capsys):
    code, out, _ = run(["--target", models, "--prompt", "Hi", "--max-new-tokens", 16, "--no-draft"], capsys)
    assert code == 0
    target = load_target(models)
    tokenizer = load_tokenizer(models)
    prompt = tokenizer.encode(render_chat(GEMMA4_TEMPLATE, [{"role": "user", "content": "Hi"}]))
    tokens = generate(target, None, prompt, max_new_tokens=16).tokens
    assert out == tokenizer.decode(tokens) + "\n"


def test_raw_prompt_and_prompt_ids(models, capsys):
    tokenizer = load_tokenizer(models)
    ids = tokenizer.encode("def f(x):", add_bos=True)
    _, raw, _ = run(["--target", models, "--prompt", "def f(x):", "--raw", "--max-new-tokens", 8, "--no-draft",
                     "--json"], capsys)
    _, by_ids, _ = run(["--target", models, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", 8,
                        "--no-draft", "--json"], capsys)
    assert last_json(raw)["tokens"] == last_json(by_ids)["tokens"]


def test_compare_reports_speedup_and_equal_outputs(models, capsys):
    code, out, err = run(["--target", models, "--prompt", "Hello", "--max-new-tokens", 12, "--compare", "--json"],
                         capsys)
    assert code == 0, err
    report = last_json(out)
    assert report["outputs_equal"] is True
    assert report["baseline"]["tokens"] == report["tokens"]
    assert report["speedup"] > 0
    assert "speed-up" in err


def test_show_drafts_marks_accepted_rejected_and_bonus(models, capsys):
    code, out, err = run(["--target", models, "--prompt", "Hello", "--max-new-tokens", 10, "--num-draft-tokens", 2,
                          "--show-drafts", "--json"], capsys)
    assert code == 0, err
    report = last_json(out)
    lines = out.strip().splitlines()[:-1]
    rounds = [line for line in lines if line.startswith("[") and not line.startswith("[0/0]")]
    assert len(rounds) == len(report["stats"]["rounds"])
    for line, (drafted, accepted) in zip(rounds, report["stats"]["rounds"]):
        assert line.startswith(f"[{accepted}/{drafted}] ")
        body = line.split("] ", 1)[1]
        assert body.count("+") // 2 == accepted and body.count("-") // 2 >= drafted - accepted
        assert "*" in body  # the target's bonus token


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target", "/no/such/folder"], "checkpoint not found"),
        (["--max-new-tokens", 0], "--max-new-tokens must be at least 1"),
        (["--temperature", -1], "temperature must be a finite number >= 0"),
        (["--num-draft-tokens", 0], "num_draft_tokens must be an integer"),
        (["--top-p", 1.5, "--temperature", 1], "top_p must be in (0, 1]"),
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--drafter", "WRONG"], "drafter does not fit the target"),
        (["--dtype", "int8"], "unsupported dtype"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, message, models, tmp_path, capsys):
    if "WRONG" in argv:
        argv[argv.index("WRONG")] = tiny.save(tiny.build_drafter("ordered"), tmp_path / "other")
    if "--target" not in argv:
        argv = ["--target", models, *argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "error:" in err.strip().splitlines()[-1] and message in err
    assert "Traceback" not in err


def test_missing_default_drafter_and_missing_tokenizer(models, tmp_path, capsys):
    lonely = tiny.save(tiny.build_target("e2b"), tmp_path / "lonely")
    code, _, err = run(["--target", lonely, "--prompt-ids", "5,6"], capsys)
    assert code == 2 and "--drafter" in err and "--no-draft" in err
    code, _, err = run(["--target", lonely, "--no-draft", "--prompt", "hi"], capsys)
    assert code == 2 and "has no tokenizer" in err and "--prompt-ids" in err


def test_offline_hub_id_without_cache_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--target", "google/gemma-4-E2B-it"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "error: cannot fetch 'google/gemma-4-E2B-it'" in out.stderr and "Traceback" not in out.stderr


def test_ctrl_c_prints_what_was_generated_and_the_statistics(tmp_path):
    import signal

    target = tiny.save(tiny.build_target("e2b"), tmp_path / "t", eos_token_id=())  # no stop token: runs on
    tiny.save(tiny.build_drafter("e2b"), tmp_path / "t-assistant")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--target", str(target),
                             "--prompt-ids", "5,6,7", "--max-new-tokens", "100000", "--json", "--show-drafts"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = [proc.stdout.readline() for _ in range(4)]  # the prefill's token and three rounds
    assert all(line.startswith("[") for line in shown)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted:" in err and "Traceback" not in err
    report = last_json(out)
    assert report["interrupted"] is True and len(report["tokens"]) >= 4
    assert len(report["stats"]["rounds"]) >= 3
