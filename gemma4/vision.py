"""Gemma 4's vision encoder: image patches in, one embedding per image soft token out, in the text model's space.

What an image becomes (docs/gemma4.md, "Images"):
1. The processor (weights/images.py) resizes it so that its sides are multiples of k * p (patch size p = 16,
   pooling kernel k = 3) and cuts it into a grid of gh x gw patches of p x p pixels, each flattened to 3 p^2 values
   in [0, 1], row by row.
2. Patch embedding: 2 x - 1, a linear map to the vision width, plus a learned 2-D position embedding (one table for
   the column, one for the row, summed).
3. Encoder layers, every patch attending to every other (no mask: an image runs alone at its own length, so there
   is no padding): the text model's layer shape (four norms, q/k norms, v_norm without scale, attention scale 1.0,
   a gated GELU MLP) with a 2-D rotary embedding (the first half of each head rotates by the patch's column, the
   second half by its row), and, where the config says `use_clipped_linears`, every linear clamps its input and its
   output to stored bounds.
4. Pooling: a k x k average over the patch grid, times sqrt(width), in float32: (gh / k) x (gw / k) soft tokens,
   row by row. 31B and 26B-A4B then standardise them with stored per-channel bias and scale (`standardize`).
5. The multimodal embedder: an RMSNorm without scale and a linear map to the text model's hidden size. The text
   model puts these vectors where the prompt holds image tokens (gemma4/model.py, `embed_prompt`).

transformers pads every image to the processor's patch budget and masks the padding; here each image runs alone,
unpadded, which gives the same values for its real patches (masked keys add exact zeros) at a fraction of the work
for small images. Module names equal the checkpoint's keys after `model.` (`vision_tower.*`, `embed_vision.*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError
from .kernels import gelu_tanh
from .layers import Linear, RMSNorm, apply_rope


@dataclass
class VisionConfig:
    """The fields of a `gemma4` config's `vision_config` that change the math, the text width the embedder maps to,
    and the image token ids of the top level (for the placeholder expansion)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10_240
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0
    text_hidden_size: int = 1536
    soft_tokens_per_image: int = 280  # the processor's default budget (`vision_soft_tokens_per_image`)
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882

    @classmethod
    def from_dict(cls, raw: dict) -> "VisionConfig":
        """Parse a multimodal (`gemma4`) config dict; ConfigError when it has no vision part."""
        vision = raw.get("vision_config") if isinstance(raw, dict) else None
        if raw.get("model_type") != "gemma4" or not isinstance(vision, dict):
            raise ConfigError("this checkpoint has no vision encoder (config.json has no 'vision_config'): "
                              "it takes text only")
        act = vision.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"vision_config.hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
        text = raw.get("text_config") or {}
        rope = vision.get("rope_parameters") or {}
        fields = {f: vision[f] for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "rms_norm_eps", "patch_size", "pooling_kernel_size",
                                         "position_embedding_size", "use_clipped_linears", "standardize")
                  if vision.get(f) is not None}
        heads = fields.get("num_attention_heads", cls.num_attention_heads)
        fields["num_key_value_heads"] = vision.get("num_key_value_heads") or heads
        fields["head_dim"] = vision.get("head_dim") or fields.get("hidden_size", cls.hidden_size) // heads
        fields["rope_theta"] = float(rope.get("rope_theta", cls.rope_theta))
        fields["text_hidden_size"] = text.get("hidden_size", 2304)  # Gemma4TextConfig's default
        for name, key in (("soft_tokens_per_image", "vision_soft_tokens_per_image"), ("image_token_id", None),
                          ("boi_token_id", None), ("eoi_token_id", None)):
            if raw.get(key or name) is not None:
                fields[name] = raw[key or name]
        config = cls(**fields)
        config.check()
        return config

    def check(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "patch_size", "pooling_kernel_size",
                     "position_embedding_size", "text_hidden_size", "soft_tokens_per_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"vision_config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"vision_config: {self.num_attention_heads} attention heads are not a multiple of "
                              f"{self.num_key_value_heads} key/value heads")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config.head_dim must be a multiple of 4 (two rotary halves), got "
                              f"{self.head_dim}")


class VisionRMSNorm(RMSNorm):
    """RMSNorm computed as transformers writes it, x * (mean(x^2) + eps)^-0.5: the text model's faster form (one
    `vector_norm`, for decode steps bound by the number of ops) rounds differently, and the encoder's q/k norms over
    small heads amplify that to ~2e-6 in the features; this form keeps them within ~1e-7. An image is encoded
    once, so the extra ops cost nothing that matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class ClippedLinear(nn.Module):
    """A linear map without bias that, with `use_clipped_linears`, clamps its input to [input_min, input_max] and
    its output to [output_min, output_max] (scalars stored in the checkpoint). The weight sits one level down
    (`q_proj.linear.weight`), as in the checkpoint."""

    def __init__(self, config: VisionConfig, fan_in: int, fan_out: int):
        super().__init__()
        self.linear = Linear(fan_in, fan_out, bias=False)
        self.clipped = config.use_clipped_linears
        if self.clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(math.inf if name.endswith("max") else -math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        return torch.clamp(self.linear(torch.clamp(x, self.input_min, self.input_max)),
                           self.output_min, self.output_max)


def rope_2d(grid: tuple[int, int], head_dim: int, theta: float, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [P, 1, 2, d/2] of the 2-D rotary embedding for a gh x gw patch grid, patches row by row.
    Each half of a head is rotated as an ordinary rotary embedding of d/2 dims (pairs j and j + d/4), the first
    half by the patch's column, the second by its row, both with the frequencies theta^(-4i/d), i < d/4."""
    gh, gw = grid
    inv = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float, device=device) / (head_dim // 2)))
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    xy = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1)  # [P, 2]: (column, row)
    angles = xy[..., None].float() * inv  # [P, 2, d/4]
    angles = torch.cat([angles, angles], dim=-1)  # [P, 2, d/2]
    sin = angles.sin()
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # apply_rope's signed sin, per half
    return angles.cos().to(dtype)[:, None], signed.to(dtype)[:, None]


QUERY_CHUNK = 1024  # query rows per block of `attend_all`: bounds its scores to nH x 1024 x P


def attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v, every key visible, scale 1.0: q, k, v [B, nH, P, d] -> [B, nH, P, d]. Rounded as
    transformers' eager attention (scores in the model's dtype, softmax in float32): torch's CPU SDPA sums in
    blocks and moves the features by ~1e-6. Queries run in blocks, so an image of 10,080 patches (a budget of
    1,120 soft tokens) needs scores for 1,024 of them at a time, not all."""
    out = torch.empty_like(q)
    for i in range(0, q.shape[2], QUERY_CHUNK):
        scores = torch.matmul(q[:, :, i:i + QUERY_CHUNK], k.transpose(-1, -2))  # [B, nH, chunk, P]
        out[:, :, i:i + QUERY_CHUNK] = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    return out


class VisionAttention(nn.Module):
    """Bidirectional self-attention over an image's patches, with q/k norms, an unscaled v_norm and the 2-D RoPE."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        H, d, heads, kv = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d
        self.q_proj = ClippedLinear(config, H, heads * d)
        self.k_proj = ClippedLinear(config, H, kv * d)
        self.v_proj = ClippedLinear(config, H, kv * d)
        self.o_proj = ClippedLinear(config, heads * d, H)
        self.q_norm = VisionRMSNorm(d, config.rms_norm_eps)
        self.k_norm = VisionRMSNorm(d, config.rms_norm_eps)
        self.v_norm = VisionRMSNorm(d, config.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, P, _ = x.shape  # [B, P, H]
        d = self.head_dim

        def rotate(t):  # [B, P, n, d] -> [B, n, P, d], each half rotated by its own coordinate
            return apply_rope(t.unflatten(-1, (2, d // 2)), cos, sin).flatten(-2).transpose(1, 2)

        q = rotate(self.q_norm(self.q_proj(x).view(B, P, -1, d)))  # [B, nH, P, d]
        k = rotate(self.k_norm(self.k_proj(x).view(B, P, -1, d)))  # [B, n_kv, P, d]
        v = self.v_norm(self.v_proj(x).view(B, P, -1, d)).transpose(1, 2)
        g = q.shape[1] // k.shape[1]  # query heads per KV head (1 in every released config)
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = attend_all(q, k, v)  # [B, nH, P, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        H, width = config.hidden_size, config.intermediate_size
        self.gate_proj = ClippedLinear(config, H, width)
        self.up_proj = ClippedLinear(config, H, width)
        self.down_proj = ClippedLinear(config, width, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    """The text decoder layer's shape without its extras: x + post_norm(attn(pre_norm(x))), then the same for the
    MLP (no layer scalar, no per-layer input)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = VisionRMSNorm(H, eps)
        self.post_attention_layernorm = VisionRMSNorm(H, eps)
        self.pre_feedforward_layernorm = VisionRMSNorm(H, eps)
        self.post_feedforward_layernorm = VisionRMSNorm(H, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        # [2, N, H]: row 0 is indexed by the patch's column, row 1 by its row
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches [B, P, 3 p^2] in [0, 1], row by row over a gh x gw grid -> [B, P, H]."""
        gh, gw = grid
        x = self.input_proj((2 * (patches - 0.5)).to(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        pos = table[0, :gw][None, :] + table[1, :gh][:, None]  # [gh, gw, H]
        return x + pos.reshape(gh * gw, -1)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTower(nn.Module):
    """Patches -> pooled soft tokens [B, N, H_vision] (float32 out of the pool, standardised, in the weights'
    dtype)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        cfg = self.config
        gh, gw = grid
        k = cfg.pooling_kernel_size
        x = self.patch_embedder(patches, grid)  # [B, P, H]
        cos, sin = rope_2d(grid, cfg.head_dim, cfg.rope_theta, x.dtype, x.device)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin)
        B, _, H = x.shape
        # k x k average pool over the grid, in float32 (sqrt(H) times the mean can leave float16's range)
        pooled = x.float().view(B, gh // k, k, gw // k, k, H).mean(dim=(2, 4)).reshape(B, -1, H)  # [B, N, H]
        pooled = pooled * H**0.5
        if cfg.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled.to(x.dtype)


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> the text model's embedding space: RMSNorm without scale, then a linear map."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embedding_pre_projection_norm = VisionRMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.embedding_projection = Linear(config.hidden_size, config.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionModel(nn.Module):
    """`vision_tower` and `embed_vision` of a Gemma 4 checkpoint: `model(patches, grid)` -> [N, H_text], the
    embeddings of one image's N = (gh / k) (gw / k) soft tokens, in the order the prompt's image tokens take them."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.embed_vision = MultimodalEmbedder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_vision.embedding_projection.weight.device

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches [P, 3 p^2] (or [1, P, 3 p^2]) of a gh x gw grid, P = gh gw, both multiples of the pooling
        kernel -> [N, H_text]."""
        gh, gw = grid
        k = self.config.pooling_kernel_size
        patches = patches.reshape(1, -1, patches.shape[-1]) if patches.dim() == 2 else patches
        if patches.shape[1] != gh * gw or gh % k or gw % k or patches.shape[-1] != 3 * self.config.patch_size**2:
            raise ValueError(f"patches {list(patches.shape)} do not form a {gh} x {gw} grid of "
                             f"{self.config.patch_size}-pixel patches whose sides are multiples of {k}")
        if max(gh, gw) > self.config.position_embedding_size:
            raise ValueError(f"a {gh} x {gw} patch grid exceeds the position table's "
                             f"{self.config.position_embedding_size} entries")
        return self.embed_vision(self.vision_tower(patches.to(self.device), grid))[0]  # [N, H_text]
