"""The vision encoder (gemma4/vision.py) against transformers 5.24's Gemma4VisionModel + Gemma4MultimodalEmbedder.

Tiny random checkpoints with each released family's vision geometry (tests/tiny.py VISION_FAMILIES): E2B/E4B-like
with clipped linears (bounds drawn so that clamping happens), 31B/26B-like with standardisation. transformers gets
the patches padded to the processor's budget with (-1, -1) positions, as its processor gives them; ours runs the
image unpadded. The oracle is `get_image_features(...).pooler_output`: the embeddings the text model receives.
"""

import pytest
import torch

from gemma4.vision import VisionModel
from weights import CheckpointError, load_target, load_vision

BUDGET = 630  # patches of a 70-soft-token budget (pooling 3): the tiny checkpoints' vision_soft_tokens_per_image


def grid_positions(gh: int, gw: int) -> torch.Tensor:
    """(column, row) of each patch, row by row: [gh * gw, 2]."""
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1)


def padded(patches: torch.Tensor, gh: int, gw: int, budget: int = BUDGET):
    """transformers' pixel_values [1, budget, D] and image_position_ids [1, budget, 2] for one image."""
    P, D = patches.shape
    values = torch.zeros(1, budget, D)
    values[0, :P] = patches
    positions = torch.full((1, budget, 2), -1, dtype=torch.long)
    positions[0, :P] = grid_positions(gh, gw)
    return values, positions


def transformers_features(folder, patches, gh, gw):
    from transformers import Gemma4ForConditionalGeneration

    hf = Gemma4ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return torch.cat(hf.model.get_image_features(*padded(patches, gh, gw)).pooler_output)  # [N, H_text]


@pytest.mark.parametrize("family", ["e2b", "31b"])
@pytest.mark.parametrize("grid", [(6, 9), (3, 3), (15, 3)])
def test_features_match_transformers(family, grid, vision_checkpoint):
    folder = vision_checkpoint(family)
    gh, gw = grid
    patches = torch.rand(gh * gw, 48, generator=torch.Generator().manual_seed(gh * 100 + gw))
    ref = transformers_features(folder, patches, gh, gw)
    model = load_vision(folder)
    with torch.no_grad():
        ours = model(patches, grid)
    assert ours.shape == ref.shape == (gh * gw // 9, 64)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_clipping_and_standardisation_are_exercised(vision_checkpoint):
    """The oracle comparison is not vacuous: without the clamps (E2B-like) or the standardisation (31B-like) the
    features move far beyond the tolerance."""
    patches = torch.rand(54, 48, generator=torch.Generator().manual_seed(0))
    for family, switch in (("e2b", "clip"), ("31b", "standardize")):
        model = load_vision(vision_checkpoint(family))
        with torch.no_grad():
            full = model(patches, (6, 9))
            if switch == "clip":
                for m in model.modules():
                    if hasattr(m, "clipped"):
                        m.clipped = False
            else:
                model.vision_tower.config.standardize = False
            assert (model(patches, (6, 9)) - full).abs().max() > 1e-2


def test_vision_weights_are_loaded_only_on_request(vision_checkpoint, checkpoint):
    folder = vision_checkpoint("e2b")
    target = load_target(folder)
    assert not any("vision" in name for name, _ in target.named_parameters())
    model = load_vision(folder, dtype="bfloat16")
    assert isinstance(model, VisionModel) and model.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="no vision encoder"):
        load_vision(checkpoint("e2b"))


def test_bad_grids_are_refused(vision_checkpoint):
    model = load_vision(vision_checkpoint("e2b"))
    with pytest.raises(ValueError, match="do not form a 4 x 9 grid"):
        model(torch.rand(36, 48), (4, 9))  # 4 rows are not a multiple of the pooling kernel 3


@pytest.mark.parametrize("family", ["e2b", "31b"])
def test_bfloat16_features_stay_as_close_to_fp32_as_transformers(family, vision_checkpoint):
    """Our bfloat16 error against float32 is of the order of transformers' own bfloat16 error."""
    from transformers import Gemma4ForConditionalGeneration

    folder = vision_checkpoint(family)
    patches = torch.rand(54, 48, generator=torch.Generator().manual_seed(4))
    exact = transformers_features(folder, patches, 6, 9)
    hf = Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    values, positions = padded(patches, 6, 9)
    with torch.no_grad():
        theirs = torch.cat(hf.model.get_image_features(values.bfloat16(), positions).pooler_output).float()
        ours = load_vision(folder, dtype="bfloat16")(patches, (6, 9)).float()
    ours_err, hf_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert ours_err < 2 * hf_err + 1e-2
