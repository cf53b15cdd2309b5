"""Image files -> what the vision encoder takes: patches, their grid, and the soft-token count the prompt reserves.

The processing is transformers' Gemma 4 image processor (its Pillow backend, `Gemma4ImageProcessorPil`), step for
step, so that the pixel values are the same within float rounding:
- open: EXIF orientation applied, then `convert("RGB")` (transformers' `load_image`, which is how it opens a path:
  palette and grayscale images are expanded, an alpha channel is dropped); a palette image with a transparent
  colour keeps that colour's mark through the conversion, and the processor paints its pixels white (it
  composites anything with transparency onto white);
- resize, keeping the aspect ratio: the largest size whose sides are multiples of k * p (pooling kernel k, patch
  size p) with at most `max_soft_tokens * k^2` patches; Pillow's bicubic filter on the 8-bit image. An image whose
  short side would round to 0 gets one k * p cell on that side and its aspect ratio (capped) on the other;
- rescale to [0, 1] (x * (1/255) in float64, stored as float32); no normalisation (the model does 2x - 1);
- patches of p x p pixels, row by row, each flattened as (row in patch, column in patch, channel).
transformers pads the patches to the budget with position (-1, -1); nothing here pads (gemma4/vision.py runs each
image at its own length). The prompt reserves `num_soft_tokens` = (gh / k) (gw / k) image tokens between the
begin-of-image and end-of-image tokens (`expand_image_tokens`).

Pillow is needed only here: a clear ImportError says how to install it when an image is used without it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_PIXELS = 100_000_000  # a file claiming more is refused before decoding (10,000 x 10,000)
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the budgets Gemma 4 was trained with


class ImageError(ValueError):
    """An image file that cannot be used: missing, not an image, truncated, empty or enormous. The message names
    the file."""


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for `gemma4.vision.VisionModel`: patches [gh * gw, 3 p^2] float32 in [0, 1], row by row."""

    patches: torch.Tensor
    grid: tuple[int, int]  # (gh, gw) patches
    num_soft_tokens: int  # (gh / k) * (gw / k)
    source: str = ""  # the file it came from, for messages


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ImportError("images need Pillow: pip install pillow (or pip install -e \".[vision]\")") from None
    return PIL


def open_image(path: str | os.PathLike):
    """The file as an upright RGB Pillow image, decoded in full, or ImageError naming the file and the problem."""
    PIL = _pil()
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        image = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError:
        raise ImageError(f"{path}: the image is enormous (more than {MAX_PIXELS:,} pixels)") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not an image Pillow can read ({e})") from None
    width, height = image.size
    if width * height == 0:
        raise ImageError(f"{path}: the image has no pixels ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: the image is enormous ({width} x {height} = {width * height:,} pixels; at most "
                         f"{MAX_PIXELS:,})")
    try:
        image.load()  # decode now: a truncated file fails here, not later
        image = PIL.ImageOps.exif_transpose(image).convert("RGB")
        if image.info.get("transparency") is not None:  # a palette's transparent colour, still marked
            white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: the image data is broken or truncated ({e})") from None


def resized_size(height: int, width: int, patch_size: int, max_patches: int, pooling: int) -> tuple[int, int]:
    """The (height, width) the processor resizes to: the largest multiples of pooling * patch_size that keep the
    aspect ratio within max_patches patches; a side that would be 0 becomes one cell, the other side then gets the
    aspect ratio in cells (at most the budget's side)."""
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    cell = pooling * patch_size
    h, w = int(math.floor(factor * height / cell)) * cell, int(math.floor(factor * width / cell)) * cell
    longest = (max_patches // pooling**2) * cell
    if h == 0 and w == 0:
        raise ValueError(f"a {height} x {width} image cannot be resized to whole {cell}-pixel cells")
    if h == 0:
        h, w = cell, min(int(math.floor(width / height)) * cell, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * cell, longest), cell
    if h * w > max_patches * patch_size**2:
        raise ValueError(f"resizing {height} x {width} to {h} x {w} exceeds {max_patches} patches")
    return h, w


def process_image(image, *, patch_size: int = 16, pooling: int = 3, max_soft_tokens: int = 280,
                  source: str = "") -> ProcessedImage:
    """An RGB Pillow image (`open_image`) -> ProcessedImage (see the module docstring)."""
    PIL = _pil()
    width, height = image.size
    h, w = resized_size(height, width, patch_size, max_soft_tokens * pooling**2, pooling)
    if (h, w) != (height, width):
        image = image.resize((w, h), resample=PIL.Image.BICUBIC, reducing_gap=None)
    pixels = torch.from_numpy((np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32))  # [h, w, 3]
    gh, gw = h // patch_size, w // patch_size
    patches = pixels.view(gh, patch_size, gw, patch_size, 3).permute(0, 2, 1, 3, 4)  # [gh, gw, p, p, 3]
    return ProcessedImage(patches.reshape(gh * gw, -1), (gh, gw), gh * gw // pooling**2, source)


def load_image(path: str | os.PathLike, **options) -> ProcessedImage:
    """`open_image` then `process_image(**options)`; ImageError names the file."""
    try:
        return process_image(open_image(path), source=str(path), **options)
    except ValueError as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: {e}") from None


def expand_image_tokens(ids: list[int], counts: list[int], *, image_token_id: int, boi_token_id: int,
                        eoi_token_id: int) -> list[int]:
    """Replace the i-th image marker in `ids` (the one token `<|image|>` that the chat template writes where an
    image goes) by begin-of-image, counts[i] image tokens, end-of-image, as transformers' Gemma4Processor does.
    The number of markers must equal the number of images."""
    markers = sum(1 for t in ids if t == image_token_id)
    if markers != len(counts):
        raise ValueError(f"the prompt has {markers} image markers but {len(counts)} images were given")
    out, images = [], iter(counts)
    for t in ids:
        out.extend([boi_token_id, *[image_token_id] * next(images), eoi_token_id] if t == image_token_id else [t])
    return out


def processing_options(config) -> dict:
    """`process_image`'s options for a checkpoint's `gemma4.vision.VisionConfig`."""
    return dict(patch_size=config.patch_size, pooling=config.pooling_kernel_size,
                max_soft_tokens=config.soft_tokens_per_image)


def image_prompt(vision, ids: list[int], images: list) -> tuple[list[int], torch.Tensor | None]:
    """A prompt with images, ready for `speculative.generate(ids, image_features=...)`: `ids` holds one image
    marker (the image token, as the chat template writes `<|image|>`) per image, in order; `images` are files or
    ProcessedImages. Returns the ids with each marker expanded (`expand_image_tokens`) and the embeddings of all
    their image tokens [N, H_text] from `vision` (a `gemma4.vision.VisionModel`), None without images."""
    config = vision.config
    processed = [image if isinstance(image, ProcessedImage) else load_image(image, **processing_options(config))
                 for image in images]
    ids = expand_image_tokens(list(ids), [p.num_soft_tokens for p in processed], image_token_id=config.image_token_id,
                              boi_token_id=config.boi_token_id, eoi_token_id=config.eoi_token_id)
    if not processed:
        return ids, None
    with torch.inference_mode():
        return ids, torch.cat([vision(p.patches, p.grid) for p in processed])  # [N, H_text]


def image_parts(messages: list[dict]) -> list[str]:
    """The files of the `{"type": "image", "path": ...}` content parts of chat messages, in order (the order of the
    markers the chat template writes). Audio parts are refused: this project has no audio encoder."""
    paths = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("audio", "video"):
                raise ValueError(f"message {i}: {kind} input is not supported (this implementation has Gemma 4's "
                                 "text and image parts only; E2B/E4B's audio encoder is not implemented)")
            if kind == "image":
                path = part.get("path") or part.get("image") or part.get("url")
                if not isinstance(path, (str, os.PathLike)) or str(path).startswith(("http://", "https://")):
                    raise ValueError(f"message {i}: an image part needs a local file as \"path\", got {part!r:.120}")
                paths.append(path)
    return paths
