"""The README keeps its promises: the "Using the library" snippet runs as written and prints the target-only
output, the hub download it describes is the one the loader makes, and no document names a path of the machine
it was written on."""

import re
from pathlib import Path

import pytest

from speculative import generate
from weights.files import HUB_ALLOW_PATTERNS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("docs/**/*.md"))


def section(title: str) -> str:
    """The README's text from the heading `## {title}` to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def test_library_snippet_runs_as_written_and_prints_the_target_only_output(monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", section("Using the library"), re.DOTALL).group(1)
    monkeypatch.chdir(ROOT)  # the snippet's paths are relative to the repository root
    namespace = {}
    exec(compile(code, "README.md (Using the library)", "exec"), namespace)
    printed = capsys.readouterr().out

    target, tokenizer, prompt = namespace["target"], namespace["tokenizer"], namespace["prompt"]
    max_new_tokens = int(re.search(r"max_new_tokens=(\d+)", code).group(1))
    oracle = generate(target, None, prompt, max_new_tokens=max_new_tokens).tokens  # target-only greedy
    assert namespace["result"].tokens == oracle
    assert printed.startswith(tokenizer.decode(oracle) + "\n")
    assert re.fullmatch(r"\d+% of drafts accepted, \d+ tokens/s\n", printed[len(tokenizer.decode(oracle)) + 1:])
    assert prompt[0] == tokenizer.bos_id
    assert namespace["logits"].shape == (1, len(prompt), target.config.vocab_size)
    assert int(namespace["logits"][0, -1].argmax()) == oracle[0]  # the forward pass's greedy token starts the output


def test_readme_lists_what_a_hub_download_fetches():
    listed = set(re.findall(r"`([^`]+)`", section("Running a real Gemma 4 model").split("**Generate.**")[1]))
    assert set(HUB_ALLOW_PATTERNS) <= listed


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_no_path_of_the_developers_machine(doc):
    found = re.findall(r"(?:/work|/root|/home|/tmp)/\S*", doc.read_text(encoding="utf-8"))
    assert not found, f"{doc.name} names paths of this machine: {found}"


def test_session_snippet_runs_as_written_and_reuses_the_history(monkeypatch):
    """The Chatting section's `Session` snippet, as written (its imports included): the second turn reuses the
    first turn's cache, and each turn is the greedy answer of a fresh generate over the rendered history."""
    code = re.search(r"```python\n(.*?)```", section("Chatting"), re.DOTALL).group(1)
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(code, "README.md (Chatting)", "exec"), namespace)
    session, turn = namespace["session"], namespace["turn"]
    assert len(session.turns) == 2 and turn.prompt_tokens_reused > 0
    history = session.tokens[: len(session.tokens) - len(turn.tokens)]
    fresh = generate(namespace["target"], None, history, max_new_tokens=32, stop_token_ids=session.stops)
    assert turn.tokens == fresh.tokens


def test_figures_are_defined_where_they_are_printed_and_in_the_readme(capsys):
    """Every figure of generate.py's summary (tokens/s, acceptance, tokens/target pass, ...) is defined in its
    `--help` and, in the same words, in the README."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_script_figures", ROOT / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert {"rounds", "acceptance", "tokens/target pass", "tokens/s", "speed-up"} <= set(script.FIGURES)
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    shown, readme = " ".join(capsys.readouterr().out.split()), " ".join(README.split())
    for name, text in script.FIGURES.items():
        assert f"{name}: {text}" in shown
        assert f"**{name}**" in readme and text in readme, name


def test_commands_for_released_models_ask_for_bfloat16():
    """The released weights are bfloat16: a command that loads one in float32 (the CPU default) needs twice the
    memory (18.5 GB for E2B)."""
    commands = [line for line in README.splitlines() if re.search(r"generate\.py .*--target google/", line)]
    assert len(commands) >= 3
    assert all("--dtype bfloat16" in line for line in commands), [c for c in commands if "--dtype" not in c]


def test_the_readme_states_where_float32_is_not_bit_exact():
    """The README promises exactly the target's output; float32's default CPU products are not row-invariant
    (gemma4.kernels.row_invariant, checked against the products themselves in tests/test_layers.py), so the promise
    must name that exception and the way out. It stated the promise unconditionally before."""
    import torch

    from gemma4 import kernels

    readme = (ROOT / "README.md").read_text()
    assert kernels.row_invariant(torch.zeros(1, dtype=torch.bfloat16))
    if not kernels.row_invariant(torch.zeros(1)):  # the default float32 path
        intro = readme[:readme.index("## Start here")]
        assert "float32 with row-invariant products" in intro and "(#limits)" in intro
        limits = readme[readme.index("**Exactness, precisely.**"):readme.index("- A batch drafts one k")]
        for needed in ("set_row_invariant_float32(True)", "--row-invariant-float32", "--compare", "near-tie"):
            assert needed in limits, needed
