"""The image processor (weights/images.py) against transformers 5.24's Gemma4ImageProcessorPil, fed as transformers
feeds it a file (`transformers.image_utils.load_image`), on generated images of many shapes and modes; and the one-
line errors for files that cannot be used.

Pixel values must be equal (both take Pillow's bicubic filter on the same 8-bit image and the same float64
rescale); transformers' padding beyond the real patches must be zeros with position (-1, -1), which is why ours
has none.
"""

import struct
import sys
import zlib

import numpy as np
import pytest
import torch

from weights.images import ImageError, expand_image_tokens, load_image

PIL = pytest.importorskip("PIL.Image")


def _save(folder, name, array=None, mode=None, image=None, **kwargs):
    image = image if image is not None else PIL.fromarray(array, mode) if mode else PIL.fromarray(array)
    path = folder / name
    image.save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def noise(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    rotated = PIL.fromarray(noise(40, 90, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    return [
        _save(folder, "photo.png", noise(480, 640, 3)),
        _save(folder, "tiny.png", noise(5, 7, 3)),  # upscaled
        _save(folder, "wide.png", noise(20, 3000, 3)),  # its height rounds to 0 cells
        _save(folder, "tall.jpg", noise(2500, 30, 3)),
        _save(folder, "square.bmp", noise(48, 48, 3)),  # already a whole number of cells
        _save(folder, "gray.png", noise(300, 200)),
        _save(folder, "rgba.png", noise(200, 300, 4)),
        _save(folder, "palette.png", image=PIL.fromarray(noise(100, 150, 3)).quantize(16)),
        _save(folder, "palette_alpha.png", image=PIL.fromarray(noise(60, 80, 3)).quantize(8),
              transparency=3),
        _save(folder, "gray_alpha.png", noise(70, 50, 2), mode="LA"),
        _save(folder, "rotated.jpg", image=rotated, exif=exif),
    ]


@pytest.mark.parametrize("budget", [280, 70])
def test_pixels_equal_transformers(images, budget):
    from transformers.image_utils import load_image as hf_load_image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    processor = Gemma4ImageProcessorPil()
    for path in images:
        ref = processor(images=hf_load_image(str(path)), return_tensors="pt", max_soft_tokens=budget)
        ours = load_image(path, max_soft_tokens=budget)
        P = ours.patches.shape[0]
        assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0]), path.name
        assert P == ours.grid[0] * ours.grid[1] == ours.num_soft_tokens * 9
        torch.testing.assert_close(ours.patches, ref["pixel_values"][0, :P], atol=0, rtol=0)
        rows, cols = torch.meshgrid(torch.arange(ours.grid[0]), torch.arange(ours.grid[1]), indexing="ij")
        assert torch.equal(ref["image_position_ids"][0, :P], torch.stack([cols.flatten(), rows.flatten()], -1))
        assert (ref["image_position_ids"][0, P:] == -1).all() and (ref["pixel_values"][0, P:] == 0).all()


def test_exif_orientation_is_applied(images):
    rotated = load_image(images[-1], max_soft_tokens=70)
    gh, gw = rotated.grid
    assert gh > gw  # stored 40 x 90 (wide), viewed upright as 90 x 40 (tall)


def _png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height 8-bit RGB pixels, with one empty data chunk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_unusable_files_get_one_line_naming_them(tmp_path, images):
    cases = {}
    cases["missing.png"] = (None, "no such image file")
    (tmp_path / "notes.png").write_text("not an image at all")
    cases["notes.png"] = (None, "not an image Pillow can read")
    whole = images[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 3])
    cases["cut.png"] = (None, "broken or truncated")
    (tmp_path / "huge.png").write_bytes(_png(50_000, 40_000))
    cases["huge.png"] = (None, "enormous")
    (tmp_path / "empty.png").write_bytes(_png(0, 10))
    cases["empty.png"] = (None, "no pixels|not an image Pillow can read")
    for name, (_, message) in cases.items():
        with pytest.raises(ImageError, match=message) as error:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_placeholder_expansion_is_the_processors():
    """Gemma4Processor.replace_image_token: boi + image * n + eoi for each `<|image|>` marker, in order."""
    ids = [2, 10, 9, 11, 9, 12]
    out = expand_image_tokens(ids, [2, 3], image_token_id=9, boi_token_id=7, eoi_token_id=8)
    assert out == [2, 10, 7, 9, 9, 8, 11, 7, 9, 9, 9, 8, 12]
    with pytest.raises(ValueError, match="2 image markers but 1 images"):
        expand_image_tokens(ids, [2], image_token_id=9, boi_token_id=7, eoi_token_id=8)


def test_missing_pillow_is_a_clear_error(monkeypatch, images):
    """Pillow is an optional dependency (the "vision" extra): without it an image gets an ImportError saying so."""
    for name in ("PIL", "PIL.Image", "PIL.ImageOps"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"images need Pillow: pip install pillow"):
        load_image(images[0])
