"""Text <-> token ids for a checkpoint: one small `Tokenizer` over two backends.

Gemma 4 repos ship `tokenizer.json` (HF `tokenizers` format: BPE with byte fallback, spaces normalised to "▁"), read
with the `tokenizers` library; older checkpoints may ship a SentencePiece `tokenizer.model` instead. When both are
present, `tokenizer.json` wins, because that is what transformers loads.

Invariants:
- `encode` inserts nothing but the optional BOS. Special-token strings in the text (`<|turn>`, `<bos>`) become their
  single id, as transformers does for added tokens, because rendered chat templates contain them as text.
- Special ids come from `tokenizer_config.json` (token strings), then `config.json` / `generation_config.json` (ids),
  then the backend's own idea of them; an id nobody names is None, never a guess.
- `Tokenizer.stream()` never emits text that a later token can still change: bytes of a character split across
  byte-fallback tokens decode to U+FFFD until the character is complete, so text ending in U+FFFD is held back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .files import CheckpointError, read_optional_json


class Tokenizer:
    """Encode/decode plus the special ids generation needs. Build it with `load_tokenizer(folder)`."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None):
        self._backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size: int = backend.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True, but this tokenizer has no BOS token")
        return ([self.bos_id] if add_bos else []) + self._backend.encode(text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization: `push` one id, get the text it completed.

    Decoding token by token is wrong (a 4-byte emoji may be 4 byte-fallback tokens, and SentencePiece drops the "▁"
    of a sequence's first piece), so this decodes a short window: the ids since the last emission plus one id of
    context before them, and returns what the window adds beyond that context. Cost per token is O(window).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens)
        self._ids: list[int] = []
        self._start = 0  # window start: one id of context before the unemitted ids
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        context = self._decode(self._ids[self._start : self._read])
        text = self._decode(self._ids[self._start :])
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""  # nothing new, or a character still waiting for its remaining bytes
        self._start, self._read = self._read, len(self._ids)
        return text[len(context) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end of the stream decodes to U+FFFD)."""
        context = self._decode(self._ids[self._start : self._read])
        text = self._decode(self._ids[self._start :])
        self._start = self._read = len(self._ids)
        return text[len(context) :]


class _TokenizersBackend:
    """tokenizer.json via the `tokenizers` library; it already matches added tokens inside the text."""

    def __init__(self, path: Path):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids  # no post-processor: BOS is ours to add

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def default_special_ids(self) -> dict[str, int | None]:
        return {}


class _SentencePieceBackend:
    """tokenizer.model via sentencepiece. Its control pieces (<bos>, <eos>, ...) are never matched inside text by
    sentencepiece itself, so the text is split on them first, and they decode to their own string."""

    def __init__(self, path: Path):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a valid SentencePiece model: {e}") from None
        self.vocab_size = self._sp.get_piece_size()
        self._control = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
        pieces = sorted((self._sp.id_to_piece(i) for i in self._control), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text) if self._split else [text]):
            if i % 2:  # odd parts are the control-piece matches
                ids.append(self._sp.piece_to_id(part))
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for i in ids + [None]:  # sentinel flushes the last run of ordinary ids
            if i is None or i in self._control:
                out.append(self._sp.decode(run))
                run = []
                if i is not None and not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # unknown pieces map to unk

    def default_special_ids(self) -> dict[str, int | None]:
        ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        return {k: (v if v >= 0 else None) for k, v in ids.items()}


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json if present, else tokenizer.model."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        backend = _TokenizersBackend(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        backend = _SentencePieceBackend(folder / "tokenizer.model")
    else:
        raise CheckpointError(f"no tokenizer in {folder}: looked for tokenizer.json and tokenizer.model")
    return Tokenizer(backend, **_special_ids(folder, backend))


def _special_ids(folder: Path, backend) -> dict[str, int | None]:
    """bos/eos/pad ids: token strings in tokenizer_config.json, else ids in config.json / generation_config.json
    (top level or text_config; the first of a list, since eos_token_id is often [1, 106]), else the backend's."""
    tok_config = read_optional_json(folder / "tokenizer_config.json")
    configs = [read_optional_json(folder / "config.json"), read_optional_json(folder / "generation_config.json")]
    configs += [c["text_config"] for c in configs if isinstance(c.get("text_config"), dict)]
    found = backend.default_special_ids()
    ids = {}
    for name in ("bos", "eos", "pad"):
        token = tok_config.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        ids[f"{name}_id"] = backend.token_to_id(token) if isinstance(token, str) else None
        for config in configs:
            value = config.get(f"{name}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if ids[f"{name}_id"] is None and isinstance(value, int) and 0 <= value < backend.vocab_size:
                ids[f"{name}_id"] = value
        if ids[f"{name}_id"] is None:
            ids[f"{name}_id"] = found.get(name)
    return ids
