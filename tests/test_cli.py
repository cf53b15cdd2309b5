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
                          "--num-draft-tokens", 3, "--schedule", "constant", "--json"], capsys)
    assert code == 0, err
    report = last_json(out)
    target = load_target(models)
    drafter = load_drafter(str(models) + "-assistant", target=target)
    tokenizer = load_tokenizer(models)
    prompt = tokenizer.encode(render_chat(GEMMA4_TEMPLATE, [{"role": "user", "content": "Hello world"}]))
    library = generate(target, drafter, prompt, max_new_tokens=24, num_draft_tokens=3, schedule="constant")
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
        (["--num-draft-tokens", 0], "--num-draft-tokens must be an integer"),
        (["--top-p", 1.5, "--temperature", 1], "--top-p must be in (0, 1]"),
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
    assert len(report["stats"]["draft_lengths"]) >= 3  # a round per decode pass (auto's may draft 0)


def test_a_closed_stdout_ends_the_run_quietly():
    """`generate.py | head`: stdout closed before the answer streams; no "Broken pipe" error, no traceback, and
    the status a shell gives a program that SIGPIPE ended (or 0). The bundled pair, 8 tokens."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--max-new-tokens", "8",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) in (0, 141, -13), err
    assert "error" not in err and "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err


# --- the front door: every mistake a user can make is one line naming the option or the file, before any load ---


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the errors below must all come before it (a real checkpoint takes minutes)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(generate_script, "load_target", refuse)
    monkeypatch.setattr(generate_script, "load_drafter", refuse)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--temperature", "1e-39"], "--temperature must be 0 (greedy) or at least 1e-05"),  # crashed in multinomial
        (["--temperature", "1e-6"], "--temperature must be 0 (greedy) or at least 1e-05"),
        (["--seed", "1" * 25, "--temperature", 1], "--seed must be an integer in [0, 2**64 - 1]"),  # "Overflow ..."
        (["--seed", -1], "--seed must be an integer in [0, 2**64 - 1]"),
        (["--seed", "x"], "argument --seed: invalid int value"),
        (["--num-draft-tokens", 0], "--num-draft-tokens must be an integer in [1, "),  # cost a full load before
        (["--top-k", 0, "--temperature", 1], "--top-k must be an integer >= 1"),
        (["--max-new-tokens", 0], "--max-new-tokens must be at least 1"),
        (["--threads", 0], "--threads must be at least 1"),
        (["--dtype", "int8"], "--dtype: unsupported dtype 'int8'"),
        (["--device", "gpu0"], "--device: 'gpu0' is not a device"),
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    ],
)
def test_bad_options_fail_before_any_model_is_loaded(argv, message, models, no_loading, capsys):
    code, _, err = run(["--target", models, *argv], capsys)
    assert code == 2
    assert message in one_line_error(err)


def test_temperature_floor_and_seed_range_hold_in_the_library_too(models):
    target = load_target(models)
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or at least 1e-05"):
        generate(target, None, [2, 5], max_new_tokens=2, temperature=1e-39)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\]"):
        generate(target, None, [2, 5], max_new_tokens=2, temperature=1.0, seed=2**64)
    for seed in (0, 2**64 - 1):  # the whole range torch.Generator.manual_seed takes
        assert len(generate(target, None, [2, 5], max_new_tokens=2, temperature=1.0, seed=seed).tokens) == 2
    assert len(generate(target, None, [2, 5], max_new_tokens=2, temperature=1e-5, seed=0).tokens) == 2


def test_device_cuda_without_cuda_says_how_to_get_a_cuda_build(models, no_loading, monkeypatch, capsys):
    monkeypatch.setattr(generate_script.torch.version, "cuda", None)
    monkeypatch.setattr(generate_script.torch.cuda, "is_available", lambda: False)
    code, _, err = run(["--target", models, "--device", "cuda"], capsys)
    line = one_line_error(err)
    assert code == 2 and "--device cuda" in line and "CPU-only build" in line
    assert "https://download.pytorch.org/whl/" in line and "--device cpu" in line


def test_wrong_folders_say_what_to_pass(models, tmp_path, no_loading, capsys):
    bundled = ROOT / "tiny_gemma4"
    code, _, err = run(["--target", bundled], capsys)
    assert code == 2 and "pass --target tiny_gemma4/target" in one_line_error(err).replace(str(ROOT) + "/", "")
    code, _, err = run(["--target", bundled / "drafter"], capsys)
    assert code == 2 and "is a drafter" in one_line_error(err) and "pass it as --drafter" in err
    code, _, err = run(["--target", models, "--drafter", models], capsys)
    assert code == 2 and "--drafter" in one_line_error(err) and "pass it as --target" in err


def test_local_target_without_drafter_never_asks_the_hub(models, tmp_path, no_loading, monkeypatch, capsys):
    import huggingface_hub

    def hub(*args, **kwargs):
        raise AssertionError("a local path was turned into a hub request")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    lonely = shutil.copytree(models, tmp_path / "lonely")
    code, _, err = run(["--target", lonely, "--prompt-ids", "5,6"], capsys)
    line = one_line_error(err)
    assert code == 2 and "no drafter found for the local target" in line
    assert "lonely-assistant" in line and "--drafter" in line and "--no-draft" in line


@pytest.mark.parametrize("layout", ["sibling", "bundled", "hub-cache"])
def test_local_target_finds_its_drafter(layout, models, tmp_path, capsys):
    if layout == "sibling":
        target = shutil.copytree(models, tmp_path / "gemma")
        drafter = shutil.copytree(str(models) + "-assistant", tmp_path / "gemma-assistant")
    elif layout == "bundled":
        target = shutil.copytree(models, tmp_path / "pair" / "target")
        drafter = shutil.copytree(str(models) + "-assistant", tmp_path / "pair" / "drafter")
    else:  # huggingface_hub's cache: models--org--name/snapshots/<rev>, refs/main naming the revision
        target = shutil.copytree(models, tmp_path / "hub" / "models--org--gemma" / "snapshots" / "abc")
        repo = tmp_path / "hub" / "models--org--gemma-assistant"
        drafter = shutil.copytree(str(models) + "-assistant", repo / "snapshots" / "def")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("def")
    assert generate_script.default_drafter(str(target)) == str(drafter)
    code, out, err = run(["--target", target, "--prompt-ids", "5,6", "--max-new-tokens", 6, "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["stats"]["drafter_steps"] > 0


def test_float16_overflow_is_one_line_naming_the_dtype(tmp_path, capsys):
    """NumericalError (NaN/inf logits) escaped as a traceback. A target whose MLP overflows float16 (65504) and not
    float32: float32 runs, float16 stops with one line that says which dtypes to try."""
    import torch

    model = tiny.build_target("e2b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
                p.mul_(1000)
    folder = tiny.save(model, tmp_path / "hot")
    code, _, err = run(["--target", folder, "--no-draft", "--prompt-ids", "5,6", "--max-new-tokens", 3], capsys)
    assert code == 0, err
    code, _, err = run(["--target", folder, "--no-draft", "--prompt-ids", "5,6", "--max-new-tokens", 3,
                        "--dtype", "float16"], capsys)
    line = one_line_error(err.split("\n", 2)[-1])  # after the two loading lines
    assert code == 2 and "contain NaN or inf" in line and "--dtype bfloat16" in line


def test_compare_says_when_float32_outputs_are_compared_under_products_that_are_not_row_invariant(models, capsys):
    """Float32's default CPU products give a row other bits with other row counts (tests/test_layers.py::
    test_the_default_float32_path_is_not_row_invariant), so greedy --compare in float32 is exact only up to
    rounding, and says so (stderr and JSON); with --row-invariant-float32 (restored after the run) or bfloat16 it
    compares bit for bit and says nothing. Before, --compare claimed nothing either way and had no such option."""
    from gemma4 import kernels

    base = ["--target", models, "--prompt-ids", "5,6,7", "--max-new-tokens", 6, "--compare", "--json"]
    code, out, err = run(base, capsys)
    assert code == 0, err
    assert "up to rounding" in err and "--row-invariant-float32" in err and last_json(out)["row_invariant"] is False
    for extra in (["--row-invariant-float32"], ["--dtype", "bfloat16"]):
        code, out, err = run(base + extra, capsys)
        assert code == 0, err
        assert "up to rounding" not in err and last_json(out)["row_invariant"] is True, extra
        assert last_json(out)["outputs_equal"] is True
    assert not kernels.row_invariant_float32()


def test_compare_with_one_token_does_not_claim_a_speedup(models, capsys):
    code, out, err = run(["--target", models, "--prompt-ids", "5,6", "--max-new-tokens", 1, "--compare", "--json"],
                         capsys)
    assert code == 0, err
    assert "speed-up 0.00x" not in err and "speed-up not measurable" in err
    assert last_json(out)["speedup"] is None


def test_compare_under_sampling_says_different_outputs_are_expected(models, capsys):
    code, out, err = run(["--target", models, "--prompt-ids", "5,6", "--max-new-tokens", 8, "--compare",
                          "--temperature", 1, "--seed", 0, "--json"], capsys)
    assert code == 0, err
    assert "expected under sampling" in err and "DIFFER" not in err and "warning" not in err


def test_every_option_has_help_and_show_drafts_explains_its_markers(capsys):
    with pytest.raises(SystemExit):
        generate_script.parse_args(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    options = {}
    for i, line in enumerate(lines):
        if line.startswith("  -"):
            signature, _, described = line.strip().partition("  ")
            if not described.strip() and i + 1 < len(lines) and not lines[i + 1].strip().startswith("-"):
                described = lines[i + 1]
            options[signature.split()[0].rstrip(",")] = described.strip()
    assert {"--target", "--drafter", "--threads", "--max-new-tokens", "--device", "--show-drafts"} <= set(options)
    assert all(options.values()), {k: v for k, v in options.items() if not v}
    flat = " ".join(text.split())
    for marker in ("green", "red", "+accepted+", "-rejected-", "*bonus*", "not a terminal"):
        assert marker in flat


def test_threads_option_is_honoured_and_restored(models, capsys):
    import torch

    before = torch.get_num_threads()
    for n in (1, 2):
        code, out, err = run(["--target", models, "--prompt-ids", "5,6", "--max-new-tokens", 2, "--no-draft",
                              "--threads", n, "--json"], capsys)
        assert code == 0, err
        assert last_json(out)["threads"] == n
        assert f", {n} thread" in err
    assert torch.get_num_threads() == before


def test_default_threads_leave_out_the_cores_other_processes_keep_busy(monkeypatch):
    monkeypatch.setattr(generate_script.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(generate_script.torch, "get_num_threads", lambda: 4)
    for busy, expected in ((0, 4), (1, 3), (3, 1), (7, 1)):
        monkeypatch.setattr(generate_script, "busy_elsewhere", lambda busy=busy: busy)
        assert generate_script.default_threads() == expected


def test_busy_elsewhere_sees_a_busy_process():
    if not Path("/proc/stat").exists():
        assert generate_script.busy_elsewhere() == 0
        return
    loop = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 20\n"
                             "while time.monotonic() < end: pass"])
    try:
        import time

        time.sleep(0.3)
        assert generate_script.busy_elsewhere() >= 1
    finally:
        loop.kill()
        loop.wait()


def test_paths_are_shown_as_given_or_relative_to_the_working_directory(models, monkeypatch, capsys):
    monkeypatch.chdir(models.parent)
    code, _, err = run(["--target", models, "--prompt-ids", "5,6", "--max-new-tokens", 2], capsys)
    assert code == 0, err
    assert f"loading target {models.name} (" in err and f"loading drafter {models.name}-assistant ..." in err
    assert str(models.parent) not in err
    monkeypatch.chdir(ROOT)
    assert generate_script.shown(generate_script.BUNDLED_TARGET) == str(Path("tiny_gemma4") / "target")
    assert generate_script.shown("/elsewhere/model") == "/elsewhere/model"
