"""Configuration of the MTP drafter (`gemma4_assistant`) and its compatibility with a target.

The drafter's decoder is a Gemma 4 text stack (its `text_config`) in which every layer is a KV-sharing "reuse"
layer: it owns no K/V and attends to the target's. That is why the pair must agree on head dims, KV heads per
attention type, vocabulary, and the target's hidden size (the drafter's input is [target embedding ; target hidden]).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma4 import ConfigError, Gemma4Config


class IncompatibleDrafterError(ValueError):
    """A drafter that cannot read this target's K/V or hidden states."""


@dataclass
class DrafterConfig:
    text: Gemma4Config  # the drafter's own decoder; every layer "reuse"
    backbone_hidden_size: int  # the target's hidden size H_t
    use_ordered_embeddings: bool = False  # centroid-masked output head (E2B/E4B drafters)
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, raw: dict) -> "DrafterConfig":
        if not isinstance(raw, dict) or raw.get("model_type") != "gemma4_assistant":
            found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(f"a drafter config needs model_type 'gemma4_assistant', found {found!r}")
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("a 'gemma4_assistant' config needs a 'text_config' object")
        text = {"model_type": "gemma4_text", **text}
        if not text.get("num_kv_shared_layers"):  # as transformers: a drafter layer never owns K/V
            text["num_kv_shared_layers"] = text.get("num_hidden_layers", Gemma4Config.num_hidden_layers)
        cfg = cls(
            text=Gemma4Config.from_dict(text),
            backbone_hidden_size=raw.get("backbone_hidden_size", 1536),
            use_ordered_embeddings=raw.get("use_ordered_embeddings", False),
            num_centroids=raw.get("num_centroids", 2048),
            centroid_intermediate_top_k=raw.get("centroid_intermediate_top_k", 32),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        t = self.text
        for name in ("backbone_hidden_size", "num_centroids", "centroid_intermediate_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"drafter config field {name} must be a positive integer, got {value!r}")
        if not isinstance(self.use_ordered_embeddings, bool):
            raise ConfigError(f"use_ordered_embeddings must be true or false, got {self.use_ordered_embeddings!r}")
        if t.num_kv_shared_layers != t.num_hidden_layers:
            raise ConfigError("every drafter layer must reuse the target's K/V (num_kv_shared_layers == num_hidden_layers)")
        if t.uses_ple or t.enable_moe_block or t.use_double_wide_mlp:
            raise ConfigError("a drafter has no per-layer embeddings, MoE block or double-wide MLP")
        if self.use_ordered_embeddings:
            if t.vocab_size % self.num_centroids:
                raise ConfigError(f"vocab_size={t.vocab_size} is not divisible by num_centroids={self.num_centroids}")
            if self.centroid_intermediate_top_k > self.num_centroids:
                raise ConfigError(
                    f"centroid_intermediate_top_k={self.centroid_intermediate_top_k} exceeds "
                    f"num_centroids={self.num_centroids}"
                )

    @property
    def sliding_history(self) -> int:
        """Accepted sliding-window positions a draft step reads: W_a + 1 (one more than a target query sees)."""
        return self.text.sliding_window + 1


def check_compatible(drafter: DrafterConfig, target: Gemma4Config) -> None:
    """Raise IncompatibleDrafterError naming the first mismatch between a drafter and the target it would read."""
    problems = []
    if drafter.backbone_hidden_size != target.hidden_size:
        problems.append(f"drafter backbone_hidden_size={drafter.backbone_hidden_size} but target hidden_size="
                        f"{target.hidden_size}")
    if drafter.text.vocab_size != target.vocab_size:
        problems.append(f"drafter vocab_size={drafter.text.vocab_size} but target vocab_size={target.vocab_size}")
    for t in drafter.text.attention_types():
        mine = next(s for s in drafter.text.layers if s.attention_type == t)
        if t not in target.export_layer:
            problems.append(f"the target has no {t} layer to export K/V from")
            continue
        theirs = target.layers[target.export_layer[t]]
        if mine.head_dim != theirs.head_dim:
            problems.append(f"{t}: drafter head_dim={mine.head_dim} but target head_dim={theirs.head_dim}")
        if mine.num_kv_heads != theirs.num_kv_heads:
            problems.append(f"{t}: drafter expects {mine.num_kv_heads} KV heads but target has {theirs.num_kv_heads}")
    if problems:
        raise IncompatibleDrafterError("drafter does not fit the target: " + "; ".join(problems))
