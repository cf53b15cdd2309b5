"""scripts/gpu_check.py's reduced mode (--cpu-smoke: every part at tiny sizes, on the CPU through the generic path),
so that the one command a GPU machine runs cannot rot. Asserts the values it produces, not only that it runs:
parity within its stated tolerances for every tiny family, mismatch counts that add up (equal token counts,
differences located), every SDPA call the model made eligible for a fused kernel, timings for every length asked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("gpu_check")
    results = module.main(["--cpu-smoke", "--out", str(out)])
    return results, out


def test_it_writes_the_json_and_markdown_it_returns(smoke):
    results, out = smoke
    assert json.loads((out / "gpu_check.json").read_text())["mode"] == "cpu-smoke"
    text = (out / "gpu_check.md").read_text()
    for family in tiny.TARGET_CONFIGS:
        assert f"| {family} |" in text
    errors = {k: v for k, v in results.items() if isinstance(v, dict) and ("error" in v or "skipped" in v)}
    assert errors == {}


def test_parity_covers_every_family_within_tolerance(smoke):
    parity = smoke[0]["parity"]
    assert set(parity) == set(tiny.TARGET_CONFIGS)
    for family, row in parity.items():
        assert max(row["float32"]["prefill_err"], row["float32"]["decode_err"]) < 1e-4, family
        assert row["bfloat16"]["ok"] and row["bfloat16"]["tol"] < 3, family
        assert row["transformers_bfloat16_err"] > 1e-3  # bfloat16 really ran: rounding is visible


def test_mismatch_counts_add_up(smoke):
    for family, row in smoke[0]["mismatch"].items():
        assert row["runs"] == 2 and row["target_only_tokens"] == row["speculative_tokens"] == 24, family
        assert len(row["first_difference_at"]) == row["differing"] <= row["runs"]
    assert max(row["acceptance"] for row in smoke[0]["mismatch"].values()) > 0.2  # drafts were accepted
    for dtype, row in smoke[0]["bundled"].items():
        assert row["speedup"] > 0 and row["mismatch"]["target_only_tokens"] == row["mismatch"]["speculative_tokens"]
        assert row["mismatch"]["acceptance"] > 0.15, dtype  # the trained pair drafts (random weights: ~0)


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-moe"])
def test_geometry_figures_for_every_length_and_only_fused_attention(name, smoke):
    row = smoke[0][f"geometry {name}"]
    assert set(row["prefill"]) == {64, 128} and all(v["tokens_per_s"] > 0 for v in row["prefill"].values())
    assert set(row["eager"]["verify_ms"]) == set(row["transformers"]["verify_ms"]) == {1, 2, 3}
    assert row["eager"]["decode_ms"] > 0 and row["transformers"]["decode_ms"] > 0
    assert row["math_kernel_needed"] is False
    assert row["sdpa_calls"] and all(call["rules"] for call in row["sdpa_calls"])
    assert any(call["is_causal"] for call in row["sdpa_calls"])  # the prefill from position 0 took is_causal
    if name == "tiny-e2b":  # per-layer embeddings: the table on the device and on the host, both timed
        assert all(row["ple_rows"][n]["host_ms"] > 0 for n in (1, 9))
