"""The draft-length arithmetic of `scripts/benchmark.py` (acceptance per position, the conditional acceptance
factors, the predicted tokens per round and speed-up) against a simulated loop whose acceptance law is known."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark  # its dataclasses look their module up
_spec.loader.exec_module(benchmark)

ALPHA = [0.9, 0.8, 0.7, 0.6]  # P(draft j accepted | drafts before it accepted)


def simulate(n: int, rounds: int, seed: int) -> list[tuple[int, int]]:
    """(drafted, accepted) per round: drafts are accepted in order, draft j with probability ALPHA[j-1], until the
    first rejection (what greedy verification does)."""
    rng = np.random.default_rng(seed)
    accepted_each = (rng.random((rounds, n)) < np.array(ALPHA[:n])).cumprod(axis=1).sum(axis=1)
    return [(n, int(a)) for a in accepted_each]


def test_conditional_alpha_recovers_the_acceptance_law():
    got = benchmark.conditional_alpha(simulate(4, 40_000, seed=0), 4)
    assert got == pytest.approx(ALPHA, abs=0.01)


def test_acceptance_per_position_is_the_product_of_the_factors():
    got = benchmark.acceptance_per_position(simulate(4, 40_000, seed=1), 4)
    assert got == pytest.approx([math.prod(ALPHA[:j]) for j in range(1, 5)], abs=0.01)


def test_rounds_that_drafted_fewer_do_not_count_at_later_positions():
    rounds = [(2, 2), (2, 0), (4, 3), (4, 4)]  # heuristic schedule: N varies between rounds
    assert benchmark.acceptance_per_position(rounds, 4) == [0.75, 0.75, 1.0, 0.5]
    assert benchmark.conditional_alpha(rounds, 4) == [0.75, 1.0, 1.0, 0.5]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_predicted_tokens_per_round_and_speedup_match_a_simulated_loop(n):
    rounds = simulate(n, 40_000, seed=n)
    tokens_per_round = np.mean([a + 1 for _, a in rounds])  # accepted drafts + the target's bonus token
    costs = {"c_t": 10.0, "c_d": 1.0, "c_v": {n: 12.0}}
    expected, speedup = benchmark.predicted_speedup(ALPHA, n, costs)
    assert expected == pytest.approx(tokens_per_round, rel=0.01)
    # the simulated loop: tokens_per_round tokens per (n drafter steps + one verify); target-only: c_t per token
    assert speedup == pytest.approx(tokens_per_round / (n * 1.0 + 12.0) * 10.0, rel=0.01)


def test_the_reports_folder_exists_before_any_section_runs(tmp_path):
    """Sections write raw results beside the report as they finish (the schedules grid's JSON after 15 minutes): a
    new folder named by --out is made when the arguments are read, not when the report is written."""
    out = tmp_path / "new" / "folder" / "BENCHMARKS.md"
    args = benchmark.parse_args(["--only", "schedules", "--out", str(out)])
    assert args.out == out and out.parent.is_dir() and not out.exists()


def test_a_run_writes_its_report_outside_the_repository_unless_told_to_write(tmp_path, monkeypatch, capsys):
    """`benchmark.py` (here `--only training`, which measures nothing) leaves the committed BENCHMARKS.md as it is
    and writes its report to the temporary directory, the committed sections kept; `--write` replaces it."""
    import tempfile

    import torch

    repo, temporary = tmp_path / "repo", tmp_path / "tmp"
    repo.mkdir(), temporary.mkdir()
    committed = (ROOT / "BENCHMARKS.md").read_text()
    (repo / "BENCHMARKS.md").write_text(committed)
    monkeypatch.setattr(benchmark, "ROOT", repo)
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--only", "training"]) == 0
        assert (repo / "BENCHMARKS.md").read_text() == committed
        report = (temporary / "gemma4-benchmarks" / "BENCHMARKS.md").read_text()
        training = committed.split("## 7. ")[1].split("\n## ")[0]
        assert training in report
        assert benchmark.main(["--only", "training", "--write"]) == 0
        assert "Produced by `python scripts/benchmark.py --only training --write`" in (repo / "BENCHMARKS.md").read_text()
    finally:
        torch.set_num_threads(threads)
