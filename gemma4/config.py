"""Gemma 4 text configuration: what `config.json` says, plus the per-layer values derived from it.

A checkpoint describes the full-attention geometry in one of two ways: the hub form (`global_head_dim`,
`num_global_key_value_heads`) or the form transformers writes on `save_pretrained` (`per_layer_config`, keyed by
layer index as a string). Both are parsed here, and every per-layer value the model needs (head dim, KV heads,
KV-sharing mode, MLP width, whose K/V a layer attends to) is computed once, in `_derive_layers`. Nothing else in the
package re-derives them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FULL = "full_attention"
SLIDING = "sliding_attention"
ATTENTION_TYPES = (FULL, SLIDING)

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


class ConfigError(ValueError):
    """A config.json that cannot describe a Gemma 4 model (wrong types, impossible sizes, unknown fields)."""


@dataclass(frozen=True)
class RopeParams:
    """Rotary embedding of one attention type: `default` rotates every pair, `proportional` only the first
    `int(partial_rotary_factor * head_dim // 2)` pairs (the others get frequency 0 and pass through unchanged)."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    """Everything that differs between decoder layers, derived once from the config."""

    index: int
    attention_type: str  # FULL or SLIDING
    head_dim: int
    num_kv_heads: int
    kv_mode: str | None  # None: own K/V; "store": own K/V, exported to reuse layers and drafters; "reuse": none
    kv_source: int  # index of the layer whose K/V this layer attends to (itself unless "reuse")
    has_v_proj: bool  # False on k_eq_v full layers: V is the raw k_proj output
    mlp_width: int


@dataclass
class Gemma4Config:
    """The fields of a `gemma4_text` config that change the math (see docs/gemma4.md), with transformers' defaults."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict[int, dict] | None = None  # transformers-saved form of the full-layer geometry
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 262_144
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    use_bidirectional_attention: str | None = None  # "vision": sliding layers see a whole image (gemma4/model.py)
    image_token_id: int | None = None  # multimodal checkpoints: the token image embeddings replace (top level)

    # Derived in __post_init__, never read from config.json.
    layers: list[LayerSpec] = field(init=False, repr=False)
    rope: dict[str, RopeParams] = field(init=False, repr=False)
    export_layer: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        _check_types(self)
        if self.layer_types is None:  # transformers' default pattern: every 6th layer is full
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(ATTENTION_TYPES))
        if unknown:
            raise ConfigError(f"unknown layer types {unknown}; expected {list(ATTENTION_TYPES)}")
        self.layer_types[-1] = FULL  # transformers forces the last layer to full attention
        rope = self.rope_parameters if self.rope_parameters is not None else _DEFAULT_ROPE
        types = list(dict.fromkeys(self.layer_types))  # in order of first use: the same order in every process
        self.rope = {t: _parse_rope(rope, t) for t in types}
        self.layers = _derive_layers(self)
        self.export_layer = {
            t: max(s.index for s in self.layers if s.attention_type == t and s.kv_mode == "store")
            for t in types
            if any(s.kv_mode == "store" and s.attention_type == t for s in self.layers)
        }
        _check_sizes(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Gemma4Config":
        """Parse a `gemma4_text` dict, or the text part of a multimodal `gemma4` dict: its `text_config`, with the
        fields transformers reads from the top level taken from there (`_top_level_fields`)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        top = None
        if model_type == "gemma4":
            top, raw = raw, raw.get("text_config")
            if not isinstance(raw, dict):
                raise ConfigError("a 'gemma4' config needs a 'text_config' object")
            model_type = raw.get("model_type", "gemma4_text")
        if model_type != "gemma4_text":
            raise ConfigError(
                f"unknown model_type {model_type!r}; expected 'gemma4' (multimodal) or 'gemma4_text'"
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if top is not None:
            kwargs.update(_top_level_fields(top))
        if kwargs.get("per_layer_config") is not None:
            try:
                kwargs["per_layer_config"] = {int(k): dict(v) for k, v in kwargs["per_layer_config"].items()}
            except (AttributeError, TypeError, ValueError) as e:
                raise ConfigError(f"per_layer_config must map layer indices to objects: {e}") from None
        return cls(**kwargs)

    @property
    def uses_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    def attention_types(self) -> list[str]:
        """The attention types present, in a fixed order."""
        return [t for t in ATTENTION_TYPES if t in self.layer_types]


def _top_level_fields(top: dict) -> dict:
    """What a multimodal (`gemma4`) config's top level decides for the text model, as transformers 5.24 does.

    - `tie_word_embeddings`: Gemma4ForConditionalGeneration ties its lm_head by its own (top-level) config, whose
      default is true; the `text_config` value is never read for tying. So the top level wins even when absent.
    - `eos_token_id`, `bos_token_id`: with no generation_config.json, generation uses
      `GenerationConfig.from_model_config`, which takes each non-null top-level value first and falls back to
      `text_config`'s (the released configs say `eos_token_id: [1, 106]` at the top, `1` in text_config).
    - `image_token_id`: where image embeddings go in a prompt with images (its default when absent, as there).
    Everything that shapes the math (sizes, rope, softcapping, `pad_token_id`) is read from `text_config` only."""
    fields = {"tie_word_embeddings": top.get("tie_word_embeddings", True),
              "image_token_id": top.get("image_token_id", 258_880)}
    for name in ("eos_token_id", "bos_token_id"):
        if top.get(name) is not None:
            fields[name] = top[name]
    return fields


def _parse_rope(rope: dict, attention_type: str) -> RopeParams:
    params = rope.get(attention_type) if isinstance(rope, dict) else None
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters has no entry for {attention_type!r}")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "proportional"):
        raise ConfigError(f"rope_type {rope_type!r} for {attention_type} is not supported (default, proportional)")
    return RopeParams(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", 10_000.0)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
        factor=float(params.get("factor", 1.0)),
    )


def _kv_modes(cfg: Gemma4Config) -> list[str | None]:
    """transformers 5.24 `kv_sharing_modes`: the last `num_kv_shared_layers` layers reuse K/V, and the last layer of
    each type before them stores (exports) it; with no sharing, the last layer of each type stores."""
    n = cfg.num_hidden_layers
    if cfg.num_kv_shared_layers == n:
        return ["reuse"] * n
    first_shared = n - cfg.num_kv_shared_layers
    modes: list[str | None] = [None if i < first_shared else "reuse" for i in range(n)]
    producers = set(cfg.layer_types[:first_shared])
    if producers != set(cfg.layer_types):
        raise ConfigError(
            f"num_kv_shared_layers={cfg.num_kv_shared_layers} leaves no layer before the shared ones for types "
            f"{sorted(set(cfg.layer_types) - producers)}"
        )
    for t in producers:
        modes[max(i for i in range(first_shared) if cfg.layer_types[i] == t)] = "store"
    return modes


def _derive_layers(cfg: Gemma4Config) -> list[LayerSpec]:
    if cfg.per_layer_config is not None:
        overrides = cfg.per_layer_config
    else:  # hub form: every full layer gets the global geometry; the KV override only with k_eq_v
        full = {"head_dim": cfg.global_head_dim}
        if cfg.attention_k_eq_v and cfg.num_global_key_value_heads is not None:
            full["num_key_value_heads"] = cfg.num_global_key_value_heads
        overrides = {i: full for i, t in enumerate(cfg.layer_types) if t == FULL}
    modes = _kv_modes(cfg)
    store = {cfg.layer_types[i]: i for i, m in enumerate(modes) if m == "store"}
    specs = []
    for i, (t, mode) in enumerate(zip(cfg.layer_types, modes)):
        o = overrides.get(i, {})
        reuse = mode == "reuse"
        specs.append(
            LayerSpec(
                index=i,
                attention_type=t,
                head_dim=int(o.get("head_dim", cfg.head_dim)),
                num_kv_heads=int(o.get("num_key_value_heads", cfg.num_key_value_heads)),
                kv_mode=mode,
                kv_source=store.get(t, i) if reuse else i,
                has_v_proj=not (cfg.attention_k_eq_v and t == FULL),
                mlp_width=cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and reuse else 1),
            )
        )
    return specs


_INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window", "hidden_size_per_layer_input",
    "vocab_size_per_layer_input", "num_kv_shared_layers", "max_position_embeddings",
)


def _check_types(cfg: Gemma4Config) -> None:
    for name in _INT_FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field {name} must be an integer, got {value!r}")
        if value < 0 or (value == 0 and name not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input",
                                                      "num_kv_shared_layers")):
            raise ConfigError(f"config field {name} must be positive, got {value}")
    for name in ("attention_k_eq_v", "use_double_wide_mlp", "enable_moe_block", "tie_word_embeddings"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"config field {name} must be true or false, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.rms_norm_eps, (int, float)) or cfg.rms_norm_eps <= 0:
        raise ConfigError(f"rms_norm_eps must be a positive number, got {cfg.rms_norm_eps!r}")
    if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation {cfg.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
    if cfg.final_logit_softcapping is not None and not (
        isinstance(cfg.final_logit_softcapping, (int, float)) and cfg.final_logit_softcapping > 0
    ):
        raise ConfigError(f"final_logit_softcapping must be a positive number or null, got {cfg.final_logit_softcapping!r}")
    if cfg.num_kv_shared_layers > cfg.num_hidden_layers:
        raise ConfigError(
            f"num_kv_shared_layers={cfg.num_kv_shared_layers} exceeds num_hidden_layers={cfg.num_hidden_layers}"
        )
    if cfg.use_bidirectional_attention == "all":
        raise ConfigError("use_bidirectional_attention='all' (non-causal) models are not supported")


def _check_sizes(cfg: Gemma4Config) -> None:
    for s in cfg.layers:
        if s.num_kv_heads <= 0 or cfg.num_attention_heads % s.num_kv_heads:
            raise ConfigError(
                f"layer {s.index}: num_attention_heads={cfg.num_attention_heads} is not a multiple of its "
                f"{s.num_kv_heads} key/value heads"
            )
        if s.head_dim <= 0 or s.head_dim % 2:
            raise ConfigError(f"layer {s.index}: head_dim must be a positive even number, got {s.head_dim}")
    if cfg.uses_ple and cfg.vocab_size_per_layer_input <= 0:
        raise ConfigError("hidden_size_per_layer_input > 0 needs vocab_size_per_layer_input > 0")
    if cfg.enable_moe_block:
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"enable_moe_block needs a positive integer {name}, got {value!r}")
        if cfg.top_k_experts > cfg.num_experts:
            raise ConfigError(f"top_k_experts={cfg.top_k_experts} exceeds num_experts={cfg.num_experts}")
