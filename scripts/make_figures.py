"""The pictures of docs/ (docs/figures/*.png), drawn from the code so that they stay true to it.

    pip install -e ".[plot]" && python scripts/make_figures.py      # rewrites docs/figures/

- `round.png`: one speculative round with k = 4 drafts of which 2 are accepted: the drafts, the verify rows and
  the target's choice at each, accepted and rejected drafts, the bonus token and the rollback. The bookkeeping
  (n, the bonus row, the cache lengths) is computed by the loop's own `accept_greedy` and `KVCache.rollback`.
- `ring.png`: the slots of a sliding-window ring before and after a rollback, read from a real `KVCache` after
  real forwards of a tiny random model (`views()` gives each slot's position).
- `e2b_layers.png`: the layer anatomy of Gemma 4 E2B, from `Gemma4Config.from_dict` of the released E2B text
  config's values (layer types, KV sharing and whose K/V each layer reads, MLP widths, per-layer embeddings).
- `vision.png`: an image's patch grid and the soft tokens its 3 x 3 pooling makes, and the masks of a prompt with
  that image, read from a real `KVCache.begin` (sliding and full layers, `use_bidirectional_attention: "vision"`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma4 import FULL, SLIDING, Gemma4Config, Gemma4Model  # noqa: E402
from speculative.sampling import accept_greedy  # noqa: E402

OUT = ROOT / "docs" / "figures"

# The text_config of google/gemma-4-E2B-it's config.json: the values that shape the model.
E2B = {
    "model_type": "gemma4_text", "vocab_size": 262144, "hidden_size": 1536, "intermediate_size": 6144,
    "num_hidden_layers": 35, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
    "global_head_dim": 512, "layer_types": ([SLIDING] * 4 + [FULL]) * 7, "sliding_window": 512,
    "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144, "num_kv_shared_layers": 20,
    "use_double_wide_mlp": True, "attention_k_eq_v": False, "enable_moe_block": False,
    "final_logit_softcapping": 30.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "rope_parameters": {FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
                        SLIDING: {"rope_type": "default", "rope_theta": 1e4}},
}

BLUE, ORANGE, GREEN, RED, GREY, LIGHT = "#4c78a8", "#f58518", "#54a24b", "#e45756", "#bab0ac", "#e8e8e8"


def box(ax, x, y, text, face, edge="black", w=0.9, h=0.7, hatch=None, color="black", size=9, weight="normal"):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x - w / 2, y - h / 2), w, h, facecolor=face, edgecolor=edge, hatch=hatch, lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, color=color, weight=weight)


# ---- one speculative round ----------------------------------------------------------------------------------------
def round_figure(plt, path: Path) -> None:
    """k = 4 drafts; the target agrees with d1 and d2 and not with d3. Positions are relative to L, the sequence
    length before the round (the last token t is at L - 1)."""
    k, agree = 4, 2
    vocab = 16
    drafts = torch.tensor([3, 5, 7, 9])  # token ids standing for d1..d4
    choice = torch.tensor([3, 5, 11, 12, 13])  # the target's argmax at verify rows 0..k
    logits = torch.nn.functional.one_hot(choice, vocab).float()
    n, bonus = accept_greedy(logits, drafts)
    n, bonus = int(n), int(bonus)
    assert n == agree and bonus == int(choice[n])
    name = {int(d): f"d{j + 1}" for j, d in enumerate(drafts)} | {11: "x", 12: "y", 13: "z"}

    cache = Gemma4Model(_tiny_config()).new_cache(max_length=32, max_rollback=k + 1)
    L = 6
    cache.begin(L - 1)  # the cache holds positions 0..L-2 before the round
    before = cache.length
    cache.begin(k + 1)  # the verify pass writes positions L-1..L-1+k
    after_verify = cache.length
    cache.rollback(k - n)
    after = cache.length

    fig, ax = plt.subplots(figsize=(11, 5.6))
    xs = {p: p - (L - 1) for p in range(L - 4, L + k + 1)}  # x = position - (L - 1)
    label = lambda p: "L" if p == L else f"L{p - L:+d}"  # noqa: E731
    left = xs[L - 4] - 0.65  # where the phase descriptions end
    rows = {"before": 5, "draft": 4, "verify": 3, "choice": 2.2, "accept": 1.2, "commit": 0}
    for p, x in xs.items():
        ax.text(x, 5.75, label(p), ha="center", fontsize=8, color="dimgray")
    # before the round
    for p in range(L - 4, L - 1):
        box(ax, xs[p], rows["before"], "cached", LIGHT)
    box(ax, xs[L - 1], rows["before"], "t", "white", edge=BLUE, weight="bold")
    ax.text(left, rows["before"], f"before: cache length {before} (= L - 1); t, the last\ntoken, is not in it yet; "
            "h = the target's\nhidden state at L-2 (the row that chose t)", va="center", ha="right", fontsize=8)
    # drafting
    for j in range(k):
        box(ax, xs[L + j], rows["draft"], f"d{j + 1}", ORANGE, color="white", weight="bold")
    for j in range(k - 1):
        ax.annotate("", (xs[L + j + 1] - 0.45, rows["draft"]), (xs[L + j] + 0.45, rows["draft"]),
                    arrowprops=dict(arrowstyle="->", color=ORANGE))
    ax.annotate("", (xs[L] - 0.45, rows["draft"]), (xs[L - 1], rows["before"] - 0.35),
                arrowprops=dict(arrowstyle="->", color=ORANGE))
    ax.text(left, rows["draft"], "draft: k = 4 drafter steps, all at position L-1,\nreading (t, h), then "
            "(d_j, its own hidden);\nattention over the clean view: positions < L-1", va="center", ha="right",
            fontsize=8)
    # verify
    for j in range(k + 1):
        box(ax, xs[L - 1 + j], rows["verify"], f"row {j}", "white", edge=BLUE)
    ax.text(left, rows["verify"], "verify: ONE target forward over\n[t, d1..d4] at positions "
            "L-1..L+3;\nrow j scores the token after it", va="center", ha="right", fontsize=8)
    for j in range(k + 1):
        c = int(choice[j])
        used = j <= n
        face = GREEN if used and j < n else (GREEN if j == n else GREY)
        box(ax, xs[L + j], rows["choice"], name[c], face if used else "white", edge=BLUE if used else GREY,
            color="white" if used else GREY, weight="bold")
        ax.annotate("", (xs[L + j] - 0.2, rows["choice"] + 0.35), (xs[L - 1 + j] + 0.2, rows["verify"] - 0.35),
                    arrowprops=dict(arrowstyle="->", color=BLUE if used else GREY))
    ax.text(left, rows["choice"], "the target's choice (argmax)\nafter each row; grey: not needed", va="center",
            ha="right", fontsize=8)
    # accept
    for j in range(k):
        if j < n:
            box(ax, xs[L + j], rows["accept"], f"d{j + 1} =", GREEN, color="white", weight="bold")
        elif j == n:
            box(ax, xs[L + j], rows["accept"], f"d{j + 1} \u2260", RED, color="white", weight="bold")
        else:
            box(ax, xs[L + j], rows["accept"], f"d{j + 1} ?", "white", edge=GREY, color=GREY)
    ax.text(xs[L + n] + 0.47, rows["accept"] + 0.42, f"bonus {name[bonus]}", fontsize=8, color=GREEN,
            weight="bold")
    ax.text(left, rows["accept"], f"accept: n = {n} leading drafts equal the\ntarget's choice; "
            f"the bonus is row {n}'s choice", va="center", ha="right", fontsize=8)
    # commit
    for p in range(L - 4, L + n):
        box(ax, xs[p], rows["commit"], "cached" if p < L - 1 else ["t", "d1", "d2", "d3"][p - L + 1],
            LIGHT if p < L - 1 else "#c6dbef")
    for p in range(L + n, L + k):
        box(ax, xs[p], rows["commit"], "", "white", edge=RED, hatch="///")
    box(ax, xs[L + n], rows["commit"], f"{name[bonus]}: next t", GREEN, color="white", w=0.8, h=0.42, weight="bold",
        size=8)
    ax.text(xs[L + k - 1] + 0.55, rows["commit"], "hatched: stale K/V of the\nrejected drafts, hidden by\nthe "
            "mask, overwritten later", va="center", fontsize=8, color=RED)
    ax.text(left, rows["commit"], f"commit: rollback(k - n = {k - n}) moves the cache\nlength "
            f"{after_verify} -> {after} (= L + n), copying nothing;\nthe bonus is the next t, row {n} the next h",
            va="center", ha="right", fontsize=8)
    ax.set_xlim(xs[L - 4] - 4.6, xs[L + k] + 0.6)
    ax.set_ylim(-0.6, 6.0)
    ax.axis("off")
    ax.set_title(f"One speculative round: k = {k} drafts, n = {n} accepted, {n + 1} tokens for one target pass "
                 f"(positions relative to L; here L = {L})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the sliding-window ring ---------------------------------------------------------------------------------------
def _tiny_config(window: int = 8) -> Gemma4Config:
    return Gemma4Config(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=8,
                        layer_types=[SLIDING, FULL], sliding_window=window, hidden_size_per_layer_input=0,
                        vocab_size_per_layer_input=0)


def ring_figure(plt, path: Path) -> None:
    """A tiny random target (W = 8) reads a 13-token prompt, verifies 1 token + 4 drafts and rejects 3 of them."""
    torch.manual_seed(0)
    model = Gemma4Model(_tiny_config()).eval()
    k, n = 4, 1
    cache = model.new_cache(max_length=64, max_rollback=k + 1)
    window = model.config.sliding_window
    with torch.inference_mode():
        model(torch.randint(0, 64, (1, 13)), cache)
        model(torch.randint(0, 64, (1, k + 1)), cache)  # verify: the last token and k drafts
        written = cache.views()[SLIDING].positions[0].clone()
        length_before = cache.length
        cache.rollback(k - n)
        visible = cache.views()[SLIDING].positions[0].clone()
    capacity = written.shape[0]
    fig, axes = plt.subplots(2, 1, figsize=(11, 3.8))
    states = [(f"after the verify pass: cache length {length_before}, positions {length_before - k - 1}.."
               f"{length_before - 1} just written", written, length_before),
              (f"after rollback({k - n}): cache length {cache.length}; the slots of the {k - n} rejected drafts are "
               f"stale (hidden by the mask until the same positions are written again)", visible, cache.length)]
    for i, (ax, (title, positions, length)) in enumerate(zip(axes, states)):
        query = length  # the next forward's first query position
        for slot in range(capacity):
            p_written = int(written[slot])
            p = int(positions[slot])
            in_window = p >= 0 and query - window < p <= query
            if p < 0 and p_written >= 0:
                box(ax, slot, 0, f"{p_written}", "white", edge=RED, hatch="///", color=RED)
            elif p < 0:
                box(ax, slot, 0, "-", "white", edge=GREY, color=GREY)
            else:
                fresh = p >= length_before - k - 1
                box(ax, slot, 0, f"{p}", ORANGE if fresh else BLUE, color="white", weight="bold",
                    edge="black" if in_window or i == 0 else "white")
            ax.text(slot, -0.6, f"slot {slot}", ha="center", fontsize=7, color="dimgray")
        nxt = query % capacity
        ax.annotate(f"next write: position {query} -> slot {nxt}", (nxt, 0.38), (nxt, 0.95), ha="center",
                    fontsize=8, arrowprops=dict(arrowstyle="->"))
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlim(-0.6, capacity - 0.4)
        ax.set_ylim(-0.9, 1.2)
        ax.axis("off")
    fig.suptitle(f"A sliding-window ring (W = {window}, {capacity} slots; position p lives in slot p % {capacity}). "
                 "Blue: older positions; orange: this verify pass; below, framed: the W keys the next query may see",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the layer anatomy of E2B --------------------------------------------------------------------------------------
def e2b_figure(plt, path: Path) -> None:
    cfg = Gemma4Config.from_dict(E2B)
    model_cls_from = _kv_shared_from(cfg)
    fig, ax = plt.subplots(figsize=(12, 4.6))
    y_type, y_kv, y_mlp, y_ple = 3.5, 2.2, 1.0, 0.0
    for s in cfg.layers:
        x = s.index
        full = s.attention_type == FULL
        box(ax, x, y_type, "F" if full else "S", RED if full else BLUE, color="white", weight="bold", size=8,
            w=0.85)
        face = {None: "white", "store": GREEN, "reuse": LIGHT}[s.kv_mode]
        text = {None: "own", "store": "st", "reuse": str(s.kv_source)}[s.kv_mode]
        box(ax, x, y_kv, text, face, size=6 if s.kv_mode is None else 7, w=0.85,
            color="white" if s.kv_mode == "store" else "black")
        wide = s.mlp_width > cfg.intermediate_size
        box(ax, x, y_mlp, "2x" if wide else "1x", ORANGE if wide else "white", size=7, w=0.85)
        box(ax, x, y_ple, "", "#d4b9da", size=7, w=0.85, h=0.4)
        ax.text(x, y_type + 0.5, str(x), ha="center", fontsize=7, color="dimgray")
    for i, (t, source) in enumerate(sorted(cfg.export_layer.items(), key=lambda item: item[1])):
        readers = [s.index for s in cfg.layers if s.kv_mode == "reuse" and s.kv_source == source]
        ax.annotate("", (readers[0], y_kv + 0.37), (source, y_kv + 0.37),
                    arrowprops=dict(arrowstyle="->", color=GREEN, connectionstyle="arc3,rad=-0.5"))
        ax.text(-0.45, y_kv + 0.47 + 0.22 * i, f"{t}: layer {source} stores; {len(readers)} "
                f"later layers and the drafter read it",
                fontsize=7, color=GREEN)
    ax.axvline(model_cls_from - 0.5, color="black", ls="--", lw=1)
    ax.text(model_cls_from - 0.4, -0.75, f"from layer {model_cls_from} on: no K/V of their own, so a prefill runs "
            "them on the last row only", fontsize=8)
    sliding = next(s for s in cfg.layers if s.attention_type == SLIDING)
    full = next(s for s in cfg.layers if s.attention_type == FULL)
    labels = {y_type: f"attention\nS: sliding (W = {cfg.sliding_window}, d = {sliding.head_dim})\nF: full (d = "
                      f"{full.head_dim}, {cfg.rope[FULL].partial_rotary_factor:.0%} of it rotated)",
              y_kv: "K/V\nown, st = store (exported),\nn = reuse layer n's",
              y_mlp: f"MLP width\n1x = {cfg.intermediate_size}, 2x = {2 * cfg.intermediate_size}",
              y_ple: f"per-layer input:\n{cfg.hidden_size_per_layer_input} values per layer per token"}
    for y, text in labels.items():
        ax.text(-1.0, y, text, ha="right", va="center", fontsize=8)
    params = sum(v for v in _parameter_counts(cfg).values())
    ple = _parameter_counts(cfg)["per-layer embedding table"]
    ax.set_title(f"Gemma 4 E2B: {cfg.num_hidden_layers} layers (4 sliding : 1 full), the last "
                 f"{cfg.num_kv_shared_layers} share K/V; {params / 1e9:.2f} B text parameters, {ple / 1e9:.2f} B of "
                 f"them the per-layer embedding table [{cfg.vocab_size_per_layer_input}, "
                 f"{cfg.num_hidden_layers} x {cfg.hidden_size_per_layer_input}]", fontsize=9)
    ax.set_xlim(-7.5, cfg.num_hidden_layers)
    ax.set_ylim(-1.0, 4.3)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- an image in the prompt ---------------------------------------------------------------------------------------
def vision_figure(plt, path: Path) -> None:
    """Left: a 6 x 9 patch grid (a 96 x 144 pixel image with 16-pixel patches) pooled 3 x 3 into 6 soft tokens,
    numbered in the order the prompt's image tokens take them. Right: the masks of a 13-token prompt holding that
    image, from KVCache.begin of a tiny config (W = 4) with use_bidirectional_attention "vision"."""
    from matplotlib.patches import Rectangle

    from gemma4.model import image_blocks

    gh, gw, k = 6, 9, 3
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.25, 1, 1]})
    ax = axes[0]
    colors = [BLUE, ORANGE, GREEN, RED, "#b279a2", "#9d755d"]
    for r in range(gh):
        for c in range(gw):
            token = (r // k) * (gw // k) + c // k
            ax.add_patch(Rectangle((c, gh - 1 - r), 1, 1, facecolor=colors[token], alpha=0.35 + 0.1 * ((r + c) % 2),
                                   edgecolor="white", lw=1))
            ax.text(c + 0.5, gh - 0.5 - r, f"{c},{r}", ha="center", va="center", fontsize=6, color="#333")
    for token in range(gh * gw // k**2):
        r, c = divmod(token, gw // k)
        ax.add_patch(Rectangle((c * k, gh - (r + 1) * k), k, k, fill=False, edgecolor="black", lw=2))
        ax.text(c * k + k / 2, gh - r * k - k / 2 - 0.05, f"soft token {token}", ha="center", va="center",
                fontsize=8, weight="bold", bbox=dict(facecolor="white", alpha=0.8, lw=0))
    ax.set_xlim(0, gw)
    ax.set_ylim(0, gh)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("patches (column, row) -> 3 x 3 average -> soft tokens", fontsize=9)

    cfg = Gemma4Config(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=8, global_head_dim=8,
                       layer_types=[SLIDING, FULL], sliding_window=4, hidden_size_per_layer_input=0,
                       vocab_size_per_layer_input=0, use_bidirectional_attention="vision", image_token_id=9)
    names = ["<bos>", "Look", ":", "<boi>"] + [f"img{i}" for i in range(6)] + ["<eoi>", "What", "?"]
    ids = torch.tensor([[2, 20, 21, 8] + [9] * 6 + [10, 22, 23]])
    cache = Gemma4Model(cfg).new_cache(max_length=16, max_rollback=0)
    masks = cache.begin(ids.shape[1], blocks=image_blocks(ids == 9)).masks
    S = ids.shape[1]
    for ax, kind, title in ((axes[1], SLIDING, "sliding layers (W = 4): an image sees itself, later tokens too"),
                            (axes[2], FULL, "full layers: causal")):
        seen = (masks[kind][0, :, :S] == 0).float()  # [S, S]: 1 where query (row) sees key (column)
        image = (ids[0] == 9).float()
        shade = seen + 0.6 * seen * (image[None, :] * image[:, None])
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=1.8)
        ax.set_xticks(range(S))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticks(range(S))
        ax.set_yticklabels(names if kind == SLIDING else [], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key", fontsize=8)
    axes[1].set_ylabel("query", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _kv_shared_from(cfg: Gemma4Config) -> int:
    """Gemma4Model.kv_shared_from without building 4.6 B parameters: the same property, on a meta-device model."""
    with torch.device("meta"):
        return Gemma4Model(cfg).kv_shared_from


def _parameter_counts(cfg: Gemma4Config) -> dict[str, int]:
    with torch.device("meta"):
        model = Gemma4Model(cfg)
    table = model.embed_tokens_per_layer.weight.numel()
    return {"per-layer embedding table": table,
            "everything else": sum(p.numel() for p in model.parameters()) - table}


def main() -> int:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: pip install -e \".[plot]\"", file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("round.png", round_figure), ("ring.png", ring_figure), ("e2b_layers.png", e2b_figure),
                       ("vision.png", vision_figure)):
        draw(plt, OUT / name)
        print(f"wrote {(OUT / name).relative_to(ROOT)} ({(OUT / name).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
