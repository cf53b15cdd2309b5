#!/usr/bin/env python
"""Write a `tokenizer.json` (the Hugging Face `tokenizers` format) that tokenizes exactly as a SentencePiece BPE
`tokenizer.model` of the kind scripts/train_tiny.py trains, and put it beside the model.

    python scripts/make_tokenizer_json.py tiny_gemma4/target tiny_gemma4/drafter

Why: the released Gemma 4 repositories ship only tokenizer.json, and tools written for them (llama.cpp's
convert_hf_to_gguf.py, for one) read that file. The bundled pair ships both; weights/tokenizer.py loads
tokenizer.json when both are present, and tests/test_tokenizer.py checks that both give the same ids.

The translation, for the model's settings (identity normalisation, no dummy prefix, byte fallback, whitespace-only
pieces allowed, "\\n" a user-defined piece, control pieces <pad>/<eos>/<bos>):
- vocabulary: every piece at its own id; merges: every way a piece splits into two pieces, ranked by the merged
  piece's id (SentencePiece BPE merges the best-scored piece first, and its scores fall with the id);
- normaliser: " " -> "▁"; no pre-tokeniser: SentencePiece's BPE encodes the whole text, and no piece spans a word
  boundary, so splitting into words changes nothing;
- control pieces are special added tokens, user-defined pieces plain added tokens (both matched in the text
  first, as SentencePiece matches user-defined symbols and our SentencePiece backend splits at control pieces);
- decoder: "▁" -> " ", byte-fallback bytes joined into characters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


USER_DEFINED = 4  # SentencePiece's piece type (sentencepiece_model.proto); its Python API has no is_user_defined


def piece_types(model: bytes) -> list[int]:
    """The type of every piece of a serialized SentencePiece ModelProto, read from the protobuf wire format
    (field 1: repeated SentencePiece; in it, field 3: type, 1 = normal by default), without the protobuf package."""

    def varint(data: bytes, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            value |= (data[i] & 0x7F) << shift
            shift += 7
            i += 1
            if data[i - 1] < 0x80:
                return value, i

    def fields(data: bytes):
        i = 0
        while i < len(data):
            key, i = varint(data, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(data, i)
            elif wire == 1:
                value, i = data[i:i + 8], i + 8
            elif wire == 2:
                size, i = varint(data, i)
                value, i = data[i:i + size], i + size
            elif wire == 5:
                value, i = data[i:i + 4], i + 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            yield number, value

    return [dict(fields(piece)).get(3, 1) for number, piece in fields(model) if number == 1]


def tokenizer_json(model_path: Path) -> str:
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    special = [i for i in range(len(pieces)) if sp.is_control(i)]
    user = [i for i, kind in enumerate(piece_types(model_path.read_bytes())) if kind == USER_DEFINED]
    unk = next(i for i in range(len(pieces)) if sp.is_unknown(i))
    merged = [i for i in range(len(pieces)) if not (sp.is_control(i) or i in user or sp.is_unknown(i)
                                                    or sp.is_byte(i)) and len(pieces[i]) > 1]
    merges = []
    for i in merged:  # ranked by the merged piece's id, then by where it splits
        piece = pieces[i]
        merges += [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=pieces[unk], byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([AddedToken(pieces[i], special=False, normalized=False) for i in user])
    return tokenizer.to_str(pretty=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="checkpoint folders holding a tokenizer.model")
    args = p.parse_args(argv)
    for folder in args.folders:
        model = folder / "tokenizer.model"
        if not model.is_file():
            print(f"error: {model} does not exist", file=sys.stderr)
            return 2
        (folder / "tokenizer.json").write_text(tokenizer_json(model) + "\n")
        print(f"wrote {folder / 'tokenizer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
