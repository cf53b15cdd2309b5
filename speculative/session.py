"""A conversation with one target (and drafter) whose KV cache is kept from one turn to the next.

Each turn, `Session.send(text)` appends the user's message, renders the whole conversation with the chat template,
tokenizes it, and hands `generate(..., cache=...)` only what the cache does not already hold. The session keeps the
token ids whose K/V the cache holds (`tokens`), and positions the cache at the longest common prefix of those and the
new turn's ids before generating:

- a template that renders earlier turns unchanged makes the new ids an extension of the cached ones: the cache is
  continued as it is, and only the new turn's tokens (plus the last answer token, whose K/V were never computed)
  are prefilled;
- a template that rewrites history (the released Gemma 4 template drops earlier thinking, and its generation prompt
  ends in an empty thought channel that the next rendering leaves out) shares a shorter prefix; the cache goes back
  to it if it can. Full-attention layers can go back anywhere (position p stays at index p), but a sliding ring
  keeps only its last `capacity` positions, so going back far is impossible from the current state. The session
  therefore also keeps a copy of the rings at the end of the latest prompt (`ring snapshot`, the size of the rings
  alone: W - 1 + 64 slots per sliding layer), which brings the cache back to that prompt's end whatever was
  generated after it; the common prefix of a rewriting template is a few tokens before it.
  When neither reaches the common prefix, a new cache is started and the whole history is prefilled; the turn's
  `cache` field says which happened (`continued`, `rolled back`, `restored`, `new`) and `cache_note` why.

Limits: a turn needs `len(prompt ids) + max_new_tokens` positions within `max_context` (default and at most the
model's `max_position_embeddings`). With `overflow="drop_oldest"` (default) the oldest messages after the system
message are dropped, one user turn and its answer at a time, until the turn fits (a documented truncation: the
rendered history then changes from its start, so that turn starts a new cache); with `overflow="error"`, or when the
newest message alone does not fit, `ContextLimitError` says how many tokens the turn needs and the session is left as
it was before the message. A verify pass may hold up to `num_draft_tokens` positions past the answer's budget for a
moment (they are rolled back): the loop keeps those within `max_position_embeddings` itself.

Stopping early: a KeyboardInterrupt raised while an answer is generated (Ctrl-C, or an `on_round` callback raising
it) ends the turn with the tokens emitted so far, `interrupted=True`; the conversation keeps that partial answer and
the cache is rolled back to exactly the tokens recorded, so the next turn continues correctly. An interrupt before
the first token (inside the prefill) discards the cache: its state is then not known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma4 import SLIDING
from gemma4.cache import CacheError, sliding_capacity
from gemma4.kernels import KEY_BLOCK
from weights.chat_template import render_chat

from .loop import generate
from .options import stop_tokens
from .schedule import DEFAULT_SCHEDULE, MAX_DRAFT_TOKENS
from .stats import GenerationStats

OVERFLOW = ("drop_oldest", "error")
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"  # Gemma 4's thinking channel markers (special tokens)


class ContextLimitError(ValueError):
    """A turn that does not fit the conversation's context limit (see the module docstring)."""


@dataclass
class Turn:
    """One answer and what it cost. `tokens` are the answer's ids (its stop token included when one ended it);
    `text` is their text with special tokens kept (thinking markers included), None without a tokenizer."""

    prompt_ids: list[int]  # the whole rendered conversation the answer continues
    tokens: list[int]
    text: str | None
    stats: GenerationStats
    cache: str  # "new", "continued", "rolled back" or "restored" (see the module docstring)
    cache_note: str | None = None  # why a new cache was started, when one was
    messages_dropped: int = 0  # messages removed from the start to fit the context limit
    interrupted: bool = False
    stopped: bool = False  # ended at a stop token (not the budget or an interrupt)

    @property
    def prompt_tokens_reused(self) -> int:
        return self.stats.prompt_tokens_reused

    @property
    def prompt_tokens_processed(self) -> int:
        return self.stats.prompt_tokens_processed

    def to_dict(self) -> dict:
        """The turn's figures as plain JSON: generate's statistics plus how the cache was used."""
        return dict(self.stats.to_dict(), cache=self.cache, cache_note=self.cache_note,
                    messages_dropped=self.messages_dropped, interrupted=self.interrupted, stopped=self.stopped)


class Session:
    """A multi-turn conversation (see the module docstring). `tokenizer` and `template` (a chat template string,
    None for the built-in Gemma 4 turn format) are needed by `send`; `generate_ids` works on token ids alone.
    `system` is the first message; `template_kwargs` reach the template (e.g. enable_thinking=True). The other
    keywords are `generate`'s; with a `seed`, turn n samples with seed + n. `compile=True` runs every turn through
    the compiled steps (speculative/compiled.py) over a static cache, grown before a turn that needs more room."""

    def __init__(self, target, drafter=None, *, tokenizer=None, template: str | None = None,
                 system: str | None = None, max_new_tokens: int = 256, max_context: int | None = None,
                 overflow: str = "drop_oldest", template_kwargs: dict | None = None, num_draft_tokens=None,
                 schedule: str = DEFAULT_SCHEDULE, temperature: float = 0.0, top_k=None, top_p=None, seed=None,
                 stop_token_ids=None, vision=None, costs=None, compile: bool = False):
        limit = target.config.max_position_embeddings
        if max_context is not None and not 1 < max_context <= limit:
            raise ValueError(f"max_context must be in [2, {limit}] (the target's max_position_embeddings), "
                             f"got {max_context!r}")
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {list(OVERFLOW)}, got {overflow!r}")
        self.target, self.drafter, self.tokenizer, self.template = target, drafter, tokenizer, template
        self.vision = vision  # gemma4.vision.VisionModel: messages may then carry images (`send(images=...)`)
        self.system, self.max_new_tokens, self.overflow = system, max_new_tokens, overflow
        self.max_context = max_context or limit
        self.template_kwargs = dict(template_kwargs or {})
        self.stops = stop_tokens(target, stop_token_ids)
        self.options = dict(num_draft_tokens=num_draft_tokens, schedule=schedule, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_token_ids=sorted(self.stops), costs=costs,
                            compile=compile)
        self.seed = seed
        self.turns: list[Turn] = []
        self.reset()

    # ---- the conversation ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new conversation: only the system message is kept; the next turn starts a new cache."""
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.tokens: list[int] = []  # the ids the conversation's cache positions correspond to (and the last one)
        self._cache, self._snapshot, self._notes = None, None, []
        # Images: id of an image content part -> (ProcessedImage, its embeddings or None until first rendered, a
        # number naming that image, the part itself: an id is only valid while its object lives). The cache is
        # matched on `_keys`: `tokens` with each image's tokens replaced by -(its number), so that two different
        # images of the same size (the same ids) never share cached K/V.
        self._images: dict[int, tuple] = {}
        self._keys: list[int] = []
        self._features, self._rendered_keys = None, None  # of the latest render

    @property
    def last(self) -> Turn | None:
        return self.turns[-1] if self.turns else None

    def send(self, text: str, *, max_new_tokens: int | None = None, on_round=None, images=None) -> Turn:
        """Answer the user message `text`: render the conversation with it, fit it to the context limit, generate,
        and append the answer (as far as it got, on an interrupt) to the messages. `images` (files, needs the
        session's `vision`): shown before the text, as `{"type": "image", "path": ...}` content parts; later turns
        find their positions in the cache like any other."""
        if self.tokenizer is None:
            raise ValueError("Session.send needs a tokenizer (pass tokenizer=); generate_ids works on token ids")
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        content = text
        if images:
            if self.vision is None:
                raise ValueError("this session has no vision model (Session(vision=weights.load_vision(...))): it "
                                 "takes text only")
            from weights.images import load_image, processing_options

            parts = [{"type": "image", "path": str(path)} for path in images]
            for part in parts:  # read and processed now: a bad file fails before anything else
                self._images[id(part)] = (load_image(part["path"], **processing_options(self.vision.config)), None,
                                          len(self._images) + 1, part)
            content = [*parts, {"type": "text", "text": text}]
        kept = list(self.messages)
        self.messages.append({"role": "user", "content": content})
        dropped = 0
        while True:
            ids = self.render()
            if len(ids) + budget <= self.max_context:
                break
            first = 1 if self.system is not None else 0
            users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if self.overflow == "error" or len(users) < 2:
                self.messages = kept
                raise ContextLimitError(
                    f"this turn needs {len(ids)} prompt tokens + max_new_tokens {budget} = {len(ids) + budget} "
                    f"positions, more than the context limit of {self.max_context}"
                    + (" even with every earlier message dropped" if self.overflow == "drop_oldest" else
                       " (overflow='error')") + ": start a new conversation (reset), or ask for fewer new tokens")
            dropped += users[1] - first  # the oldest user turn and everything up to the next one
            del self.messages[first:users[1]]
        if dropped:
            self._notes.append(f"{dropped} oldest messages dropped to fit the context limit of {self.max_context}")
        try:
            turn = self.generate_ids(ids, max_new_tokens=budget, on_round=on_round, image_features=self._features,
                                     keys=self._rendered_keys)
        except Exception:
            self.messages = kept  # the message was not answered: the conversation stays as it was
            raise
        turn.messages_dropped = dropped
        self.messages.append({"role": "assistant", "content": turn.text})
        return turn

    def render(self) -> list[int]:
        """The conversation's messages as the model reads them: the template's text (ready for the model's
        answer), tokenized, each image marker expanded to its image's tokens (their embeddings, computed once per
        image, are kept for the generation in `_features`)."""
        specials = {name: self.tokenizer.decode([i]) for name, i in
                    (("bos_token", self.tokenizer.bos_id), ("eos_token", self.tokenizer.eos_id)) if i is not None}
        text = render_chat(self.template, self.messages, add_generation_prompt=True,
                           **specials, **self.template_kwargs)
        ids = self.tokenizer.encode(text)
        parts = [part for m in self.messages if isinstance(m.get("content"), list) for part in m["content"]
                 if isinstance(part, dict) and part.get("type") == "image"]
        self._features, self._rendered_keys = None, None
        if not parts:
            return ids
        from weights.images import expand_image_tokens, load_image, processing_options

        if self.vision is None:
            raise ValueError("the conversation holds images but this session has no vision model")
        config = self.vision.config
        for part in parts:  # each image through the vision model once, the first time it is rendered
            if self._images.get(id(part), (None,) * 4)[3] is not part:  # a part put into `messages` by the caller
                self._images[id(part)] = (load_image(part["path"], **processing_options(config)), None,
                                          len(self._images) + 1, part)
            processed, features, key, _ = self._images[id(part)]
            if features is None:
                with torch.inference_mode():
                    self._images[id(part)] = (processed, self.vision(processed.patches, processed.grid), key, part)
        images = [self._images[id(p)] for p in parts]
        ids = expand_image_tokens(ids, [processed.num_soft_tokens for processed, *_ in images],
                                  image_token_id=config.image_token_id, boi_token_id=config.boi_token_id,
                                  eoi_token_id=config.eoi_token_id)
        self._features = torch.cat([features for _, features, *_ in images])  # [N, H]
        keys, numbers = [], iter(key for _, _, key, _ in images)
        for i, t in enumerate(ids):
            if t == config.image_token_id and (i == 0 or ids[i - 1] != t):
                number = next(numbers)  # a run of image tokens is one image
            keys.append(-number if t == config.image_token_id else t)
        self._rendered_keys = keys
        return ids

    # ---- one generation over the conversation's ids ----------------------------------------------------------
    def generate_ids(self, ids: list[int], *, max_new_tokens: int | None = None, on_round=None,
                     image_features=None, keys: list[int] | None = None) -> Turn:
        """Generate after `ids` (the whole conversation so far), reusing the cache up to the longest common prefix
        with the ids it holds. Returns the Turn; the session's `tokens` become ids + the answer. `image_features`:
        the embeddings of every image token in `ids` (`generate` uses those after the cached part); `keys`: `ids`
        with each image's tokens replaced by a number naming the image, matched instead of `ids` (see `render`)."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids = list(ids)
        if len(ids) + budget > self.max_context:
            raise ContextLimitError(f"{len(ids)} prompt tokens + max_new_tokens {budget} = {len(ids) + budget} "
                                    f"positions: more than the context limit of {self.max_context}")
        keys = list(ids) if keys is None else list(keys)
        how = self._seek(keys)
        cache, emitted, infos = self._cache, [], []

        def report(info):
            if not infos and cache.length == len(ids):  # the prefill's report: the cache holds exactly the prompt
                self._snapshot = cache.save_rings()
            infos.append(info)
            emitted.extend(info.emitted)
            if on_round is not None:
                on_round(info)

        seed = None if self.seed is None else (self.seed + len(self.turns)) % 2**64
        reused = cache.length
        try:
            result = generate(self.target, self.drafter, ids, max_new_tokens=budget, seed=seed, on_round=report,
                              cache=cache, image_features=image_features, **self.options)
            tokens, stats, interrupted = result.tokens, result.stats, False
        except KeyboardInterrupt:
            tokens, interrupted = emitted, True
            stats = GenerationStats(rounds=[(len(i.drafted), i.accepted) for i in infos if i.drafted],
                                    target_forward_passes=len(infos), drafter_steps=sum(len(i.drafted) for i in infos),
                                    prompt_tokens=len(ids), prompt_tokens_reused=reused,
                                    decode_tokens=max(0, len(emitted) - 1),
                                    draft_lengths=[len(i.drafted) for i in infos[1:]],
                                    expected_tokens_per_second=[i.expected_tokens_per_second for i in infos[1:]
                                                                if i.expected_tokens_per_second is not None])
            self._after_interrupt(len(ids), len(emitted))
        except Exception:  # a failed generation (NaN logits, ...) leaves the cache in a state nobody tracks
            self._cache, self._snapshot = None, None
            raise
        self.tokens, self._keys = ids + tokens, keys + list(tokens)
        text = None
        if self.tokenizer is not None:
            answer = tokens[:-1] if tokens and tokens[-1] in self.stops else tokens
            text = self.tokenizer.decode(answer)
        turn = Turn(prompt_ids=ids, tokens=list(tokens), text=text, stats=stats, cache=how,
                    cache_note="; ".join(self._notes) or None, interrupted=interrupted,
                    stopped=bool(tokens) and tokens[-1] in self.stops)
        self._notes = []
        self.turns.append(turn)
        return turn

    def _seek(self, ids: list[int]) -> str:
        """Bring the cache to the longest common prefix of the ids it holds and `ids` (never all of `ids`: its
        last token must be processed to choose the first answer token). Returns how (see the module docstring)."""
        cache = self._cache
        if cache is None:
            self._new_cache()
            return "new"
        common = min(_common_prefix(self._keys, ids), cache.length, len(ids) - 1)
        if common == cache.length:
            return "continued"
        how = "rolled back"
        try:
            cache.rollback(cache.length - common)
        except CacheError:
            snapshot, how = self._snapshot, "restored"
            try:
                if snapshot is None or snapshot.length < common or snapshot.length > cache.length:
                    raise CacheError("no ring snapshot at or after the common prefix")
                with torch.inference_mode():  # the cache's buffers are inference tensors (`_new_cache`)
                    cache.restore_rings(snapshot)
                cache.rollback(snapshot.length - common)
            except CacheError:
                back = len(self.tokens) - 1 - common
                self._notes.append(f"the conversation changed {back} tokens back (at position {common}): further "
                                   "than the sliding window's cache can return to, so the whole history is processed "
                                   "again")
                self._new_cache()
                return "new"
        if self._snapshot is not None and self._snapshot.length > common:
            self._snapshot = None  # the positions after `common` will be overwritten
        return how

    def _new_cache(self) -> None:
        """An empty one-row cache with the config's ring geometry (the same as a fresh `generate`), built to go
        back as far as its rings physically allow (`capacity - history` positions), not just one round's drafts."""
        config, history = self.target.config, getattr(self.drafter, "sliding_history", 0)
        kept = max(config.sliding_window - 1, history) if SLIDING in config.layer_types else 0
        reach = sliding_capacity(config) - kept if SLIDING in config.layer_types else MAX_DRAFT_TOKENS + 1
        with torch.inference_mode():  # as `generate`'s own caches: a compiled step's guards tell the two kinds apart
            self._cache = self.target.new_cache(batch_size=1, max_length=KEY_BLOCK,
                                                max_rollback=max(MAX_DRAFT_TOKENS + 1, reach),
                                                min_sliding_history=history, static=self.options["compile"])
        self._snapshot = None

    def _after_interrupt(self, prompt_len: int, emitted: int) -> None:
        """After a KeyboardInterrupt inside `generate`: of the prompt + emitted tokens recorded, all but the last
        have valid K/V (a round's emitted tokens were verified before they were reported, and the positions after
        them are written only by the round that was interrupted): roll the rest back. Before any token was
        emitted the prefill may have been cut halfway: the cache is discarded."""
        cache, keep = self._cache, prompt_len + emitted - 1
        try:
            if not emitted or cache.length < keep:
                raise CacheError("interrupted inside the prefill")
            cache.rollback(cache.length - keep)
        except CacheError:
            self._cache, self._snapshot = None, None
            self._notes.append("the answer was interrupted inside the prefill: the cache was discarded")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_thinking(text: str) -> tuple[str | None, str]:
    """(the thought channel's text, the answer without it) of a Gemma 4 answer `<|channel>thought\\n...<channel|>
    answer`; (None, text) when there is no thought channel. An unclosed channel (cut by the budget) is all thought."""
    if THOUGHT_OPEN not in text:
        return None, text
    before, _, rest = text.partition(THOUGHT_OPEN)
    thought, closed, after = rest.partition(THOUGHT_CLOSE)
    thought = thought.removeprefix("thought").lstrip("\n")
    return thought, (before + after) if closed else before
