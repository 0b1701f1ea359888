"""An independent plain-PyTorch implementation of the model family (no tilert IR).

It exists so that the IR-based executor and this file, written separately from the same spec
(DESIGN §5, §7), can check each other. Every weight is dequantised to float32 at construction and
all arithmetic is float32 (RoPE angles in float64, then cast), on whatever device the weights are.

Conventions that another implementation must match:
- Position p of the target sees keys at positions max(0, p-W+1) .. p on sliding layers (W =
  `AttentionSpec.window`, the key count the config's sliding-window convention gives), 0 .. p on
  full layers; the sink logit joins only the softmax denominator.
- `forward(..., return_hidden=True)` returns {i: residual stream after layer i} for every layer
  (pre final-norm, also for the last layer).
- Drafter (see PlainDFlashDrafter): the published DFlash semantics (docs/speculative.md): per layer
  full or sliding attention, bidirectional or causal, each block row with its own window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import AttentionSpec, ModelConfig
from .weights import dequantize_weight

_NEG_INF = float("-inf")


# ---- functional pieces (public so tests and other references can use them) ---------------------


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, in f32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """NeoX RoPE on the first rope_dim dims of each head. x [T, heads, d], pos [T] int.

    x1 = x[:r/2], x2 = x[r/2:r]; angle = pos * theta^(-arange(0, r, 2)/r) (computed in f64);
    out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin; dims >= r pass through.
    """
    r = rope_dim
    inv_freq = float(theta) ** (-torch.arange(0, r, 2, dtype=torch.float64, device=x.device) / r)
    ang = pos.to(device=x.device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = ang.cos().to(x.dtype)[:, None, :]
    sin = ang.sin().to(x.dtype)[:, None, :]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def causal_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[T, S] bool: key visible iff k <= q and (window == 0 or k > q - window): W keys, q included."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = kp <= qp
    if window:
        allowed &= kp > qp - window
    return allowed


def drafter_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """[T, S] bool, as the DFlash reference masks a drafter layer: causal keeps k <= q; a window W
    keeps q - k < W and, unless causal, k - q < W (each query row on its own)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed &= kp <= qp
    if window:
        allowed &= qp - kp < window
        if not causal:
            allowed &= kp - qp < window
    return allowed


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked GQA attention. q [T,Hq,d], k [S,Hkv,d], v [S,Hkv,dv], allowed [T,S] -> [T,Hq,dv].

    Query head h reads kv head h // (Hq/Hkv). With a sink (one logit per query head) the
    probabilities are exp(s_j - m) / (sum_j exp(s_j - m) + exp(sink - m)), m over scores and sink.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(~allowed[None], _NEG_INF)
    if sink is not None:
        s = torch.cat([s, sink[:, None, None].expand(-1, s.shape[1], 1).to(s.dtype)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sink is not None:
        p = p[..., :-1]
    return torch.einsum("hts,shd->thd", p, v)


def route(
    cfg: ModelConfig, x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid noaux_tc routing -> (expert ids [T,k], weights [T,k]).

    Selection uses scores + bias with group limiting (group score = sum of its top-2 selection
    scores, keep topk_group groups); the weights are the chosen unbiased scores, renormalised
    (+1e-20) when norm_topk_prob, times routed_scaling_factor. topk_method "greedy" skips groups.
    """
    scores = torch.sigmoid(x.float() @ gate_w.float().T)
    sel = scores + bias.float()
    T, E = sel.shape
    G = cfg.n_group
    if cfg.topk_method == "noaux_tc" and G > 1:
        per = E // G
        grouped = sel.view(T, G, per)
        gscore = grouped.topk(min(2, per), dim=-1).values.sum(-1)
        keep = gscore.topk(cfg.topk_group, dim=-1).indices
        gmask = torch.zeros(T, G, dtype=torch.bool, device=sel.device).scatter_(1, keep, True)
        sel = sel.masked_fill(~gmask.repeat_interleave(per, dim=1), _NEG_INF)
    idx = sel.topk(cfg.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def _f32(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return weights[name].to(torch.float32)


# ---- target model ---------------------------------------------------------------------------------


class PlainMLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate x) * up x)."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.register_buffer("w_gate", dequantize_weight(weights, prefix + "gate_proj"))
        self.register_buffer("w_up", dequantize_weight(weights, prefix + "up_proj"))
        self.register_buffer("w_down", dequantize_weight(weights, prefix + "down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.silu(x @ self.w_gate.T) * (x @ self.w_up.T)) @ self.w_down.T


class PlainMoE(nn.Module):
    """Routed experts (no shared expert): sum_k weight_k * expert_k(x)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("gate", _f32(weights, prefix + "gate.weight"))
        self.register_buffer("bias", _f32(weights, prefix + "gate.e_score_correction_bias"))
        self.experts = nn.ModuleList(PlainMLP(weights, f"{prefix}experts.{e}.") for e in range(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = route(self.cfg, x, self.gate, self.bias)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None])
        return out


class PlainAttention(nn.Module):
    """Partial-RoPE GQA attention with value scale, optional sliding window and sink, and a KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        p = f"model.layers.{layer}.self_attn."
        self.spec: AttentionSpec = cfg.attention(layer)
        self.value_scale = cfg.attention_value_scale
        for n in ("q", "k", "v", "o"):
            self.register_buffer(f"w_{n}", dequantize_weight(weights, f"{p}{n}_proj"))
        sink = _f32(weights, p + "attention_sink_bias") if self.spec.sink else None
        self.register_buffer("sink", sink)
        self.k_cache: torch.Tensor | None = None  # [S, Hkv, d] after RoPE
        self.v_cache: torch.Tensor | None = None  # [S, Hkv, dv] after value scale

    def reset(self) -> None:
        self.k_cache = self.v_cache = None

    def truncate(self, length: int) -> None:
        if self.k_cache is not None:
            self.k_cache, self.v_cache = self.k_cache[:length], self.v_cache[:length]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        s, T = self.spec, x.shape[0]
        q = rope((x @ self.w_q.T).view(T, s.num_heads, s.head_dim), pos, s.rope_dim, s.rope_theta)
        k = rope((x @ self.w_k.T).view(T, s.num_kv_heads, s.head_dim), pos, s.rope_dim, s.rope_theta)
        v = (x @ self.w_v.T).view(T, s.num_kv_heads, s.v_head_dim) * self.value_scale
        if self.k_cache is not None:
            k, v = torch.cat([self.k_cache, k]), torch.cat([self.v_cache, v])
        self.k_cache, self.v_cache = k, v
        k_pos = torch.arange(k.shape[0], device=x.device)
        allowed = causal_window_mask(pos, k_pos, s.window)
        o = attend(q, k, v, allowed, s.head_dim**-0.5, self.sink)
        return o.reshape(T, s.num_heads * s.v_head_dim) @ self.w_o.T


class PlainDecoderLayer(nn.Module):
    """x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        p = f"model.layers.{layer}."
        self.eps = cfg.layernorm_epsilon
        self.register_buffer("ln1", _f32(weights, p + "input_layernorm.weight"))
        self.register_buffer("ln2", _f32(weights, p + "post_attention_layernorm.weight"))
        self.attn = PlainAttention(cfg, layer, weights)
        self.mlp: nn.Module = PlainMoE(cfg, weights, p + "mlp.") if cfg.is_moe(layer) else PlainMLP(weights, p + "mlp.")

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.ln1, self.eps), pos)
        return x + self.mlp(rms_norm(x, self.ln2, self.eps))


class PlainModel(nn.Module):
    """The target model with a growing KV cache: forward(new tokens, start_pos) -> logits."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("embed", _f32(weights, "model.embed_tokens.weight"))
        self.layers = nn.ModuleList(PlainDecoderLayer(cfg, i, weights) for i in range(cfg.num_hidden_layers))
        self.register_buffer("norm", _f32(weights, "model.norm.weight"))
        head = self.embed if cfg.tie_word_embeddings else dequantize_weight(weights, "lm_head")
        self.register_buffer("lm_head", head)
        self.length = 0  # tokens in the KV cache

    def reset(self) -> None:
        """Drop the KV cache."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep the first `length` cache positions (rollback after a rejected draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        for layer in self.layers:
            layer.attn.truncate(length)
        self.length = length

    @torch.no_grad()
    def forward(
        self,
        token_ids: torch.Tensor | Sequence[int],
        start_pos: int | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run T new tokens at positions start_pos.. (must equal the cache length) -> logits [T, V] f32.

        With return_hidden, also {layer i: residual stream after layer i, [T, H]} for every layer.
        """
        start = self.length if start_pos is None else start_pos
        if start != self.length:
            raise ValueError(f"start_pos {start} != cached length {self.length}; truncate first")
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.embed.device).reshape(-1)
        pos = torch.arange(start, start + ids.numel(), device=ids.device)
        x = self.embed[ids]
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, pos)
            if return_hidden:
                hidden[i] = x
        self.length = start + ids.numel()
        logits = rms_norm(x, self.norm, self.cfg.layernorm_epsilon) @ self.lm_head.T
        return (logits, hidden) if return_hidden else logits


# ---- DFlash drafter -------------------------------------------------------------------------------


class _DrafterLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        d = cfg.dflash
        p = f"dflash.layers.{i}."
        for n in ("q", "k", "v", "o"):
            self.register_buffer(f"w_{n}", dequantize_weight(weights, f"{p}self_attn.{n}_proj"))
        self.register_buffer("q_norm", _f32(weights, p + "self_attn.q_norm.weight"))
        self.register_buffer("k_norm", _f32(weights, p + "self_attn.k_norm.weight"))
        self.register_buffer("ln1", _f32(weights, p + "input_layernorm.weight"))
        self.register_buffer("ln2", _f32(weights, p + "post_attention_layernorm.weight"))
        sink = _f32(weights, p + "self_attn.attention_sink_bias") if d.attention_sink else None
        self.register_buffer("sink", sink)
        self.mlp = PlainMLP(weights, p + "mlp.")
        self.window, self.causal = d.layer_window(i), d.layer_causal(i)
        self.k_ctx: torch.Tensor | None = None  # [S, Hkv, d] after k_norm and RoPE
        self.v_ctx: torch.Tensor | None = None  # [S, Hkv, d] after the value scale


class PlainDFlashDrafter(nn.Module):
    """The DFlash block drafter (DESIGN §7) with a context-only KV cache.

    Context rows are fc(concat of target hidden states at target_layer_ids) -> hidden_norm; every
    layer projects the same context features to k/v (k_norm, RoPE at the token positions) and caches
    them. A block [anchor, MASK * (B-1)] at positions start_pos .. start_pos+B-1 (start_pos = the
    anchor's position) is embedded with the target's embed_tokens (the mask token's row replaced by
    `dflash.mask_embedding` when the drafter has one); in each layer q comes from the block only,
    k/v from concat(context, block), masked as `drafter_mask` says for the layer's window and
    causality. RMSNorm eps is the drafter's rms_norm_eps; RoPE (NeoX) on the first rope_dim dims;
    v of context and block rows times attention_value_scale; the sink logit joins the softmax
    denominator. Block rows are never cached.
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], target: PlainModel | None = None) -> None:
        super().__init__()
        if cfg.dflash is None:
            raise ValueError(f"config '{cfg.name}' has no dflash drafter")
        self.cfg, self.d = cfg, cfg.dflash
        if self.d.hidden_size != cfg.hidden_size:
            raise ValueError("the drafter shares embed_tokens/lm_head, so its hidden_size must equal the target's")
        self.eps = self.d.rms_norm_eps
        if target is not None:
            embed, head = target.embed, target.lm_head
        else:
            embed = _f32(weights, "model.embed_tokens.weight")
            head = embed if cfg.tie_word_embeddings else dequantize_weight(weights, "lm_head")
        self.register_buffer("embed", embed)
        self.register_buffer("lm_head", head)
        mask = _f32(weights, "dflash.mask_embedding") if self.d.mask_embedding else None
        self.register_buffer("mask_embedding", mask)
        self.register_buffer("fc", dequantize_weight(weights, "dflash.fc"))
        self.register_buffer("hidden_norm", _f32(weights, "dflash.hidden_norm.weight"))
        self.register_buffer("norm", _f32(weights, "dflash.norm.weight"))
        self.layers = nn.ModuleList(_DrafterLayer(cfg, i, weights) for i in range(self.d.num_hidden_layers))
        self.ctx_pos: torch.Tensor | None = None  # [S] positions of the cached context entries

    @property
    def context_length(self) -> int:
        return 0 if self.ctx_pos is None else int(self.ctx_pos.numel())

    def reset(self) -> None:
        self.ctx_pos = None
        for layer in self.layers:
            layer.k_ctx = layer.v_ctx = None

    def truncate(self, length: int) -> None:
        """Keep the first `length` context entries (rollback)."""
        if not 0 <= length <= self.context_length:
            raise ValueError(f"cannot truncate a drafter context of {self.context_length} to {length}")
        if length == 0:
            return self.reset()
        self.ctx_pos = self.ctx_pos[:length]
        for layer in self.layers:
            layer.k_ctx, layer.v_ctx = layer.k_ctx[:length], layer.v_ctx[:length]

    def _heads(self, layer: _DrafterLayer, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        k = rms_norm((x @ layer.w_k.T).view(-1, d.num_key_value_heads, d.head_dim), layer.k_norm, self.eps)
        v = (x @ layer.w_v.T).view(-1, d.num_key_value_heads, d.head_dim) * d.attention_value_scale
        return rope(k, pos, d.rope_dim, d.rope_theta), v

    @torch.no_grad()
    def append_context(self, hidden: dict[int, torch.Tensor], start_pos: int | None = None) -> None:
        """Add context rows from target hidden states ({layer: [T, H]}) at positions start_pos.. ."""
        start = self.context_length if start_pos is None else start_pos
        if start != self.context_length:
            raise ValueError(f"context start_pos {start} != cached context length {self.context_length}")
        feats = torch.cat([hidden[i].float() for i in self.d.target_layer_ids], dim=-1)
        ctx = rms_norm(feats @ self.fc.T, self.hidden_norm, self.eps)
        pos = torch.arange(start, start + ctx.shape[0], device=ctx.device)
        for layer in self.layers:
            k, v = self._heads(layer, ctx, pos)
            if layer.k_ctx is not None:
                k, v = torch.cat([layer.k_ctx, k]), torch.cat([layer.v_ctx, v])
            layer.k_ctx, layer.v_ctx = k, v
        self.ctx_pos = pos if self.ctx_pos is None else torch.cat([self.ctx_pos, pos])

    def embed_block(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[ids]
        if self.mask_embedding is not None:
            x = torch.where((ids == self.d.mask_token_id)[:, None], self.mask_embedding, x)
        return x

    @torch.no_grad()
    def forward_block(self, block_ids: torch.Tensor | Sequence[int], start_pos: int) -> torch.Tensor:
        """Drafter logits [B, V] for an arbitrary block at positions start_pos.. (no caching)."""
        d = self.d
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=self.embed.device).reshape(-1)
        B = ids.numel()
        pos = torch.arange(start_pos, start_pos + B, device=ids.device)
        ctx_pos = self.ctx_pos if self.ctx_pos is not None else pos[:0]
        keys = torch.cat([ctx_pos[ctx_pos < start_pos], pos])  # context below the block, then the block
        x = self.embed_block(ids)
        for layer in self.layers:
            h = rms_norm(x, layer.ln1, self.eps)
            q = rms_norm((h @ layer.w_q.T).view(B, d.num_attention_heads, d.head_dim), layer.q_norm, self.eps)
            q = rope(q, pos, d.rope_dim, d.rope_theta)
            k, v = self._heads(layer, h, pos)
            if layer.k_ctx is not None:
                below = ctx_pos < start_pos
                k, v = torch.cat([layer.k_ctx[below], k]), torch.cat([layer.v_ctx[below], v])
            allowed = drafter_mask(pos, keys, layer.window, layer.causal)
            o = attend(q, k, v, allowed, d.head_dim**-0.5, layer.sink)
            x = x + o.reshape(B, -1) @ layer.w_o.T
            x = x + layer.mlp(rms_norm(x, layer.ln2, self.eps))
        return rms_norm(x, self.norm, self.eps) @ self.lm_head.T

    def draft(self, anchor: int, start_pos: int | None = None) -> torch.Tensor:
        """Logits [B, V] for the block [anchor, MASK * (B-1)]; start_pos defaults to the context length."""
        start = self.context_length if start_pos is None else start_pos
        return self.forward_block([anchor] + [self.d.mask_token_id] * (self.d.block_size - 1), start)

    def draft_tokens(self, anchor: int, start_pos: int | None = None) -> list[int]:
        """The B-1 drafted tokens: argmax of rows 1..B-1."""
        return self.draft(anchor, start_pos)[1:].argmax(-1).tolist()


# ---- generation loops -----------------------------------------------------------------------------


def plain_greedy_generate(model: PlainModel, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding from an empty cache; returns only the new tokens."""
    model.reset()
    if max_new_tokens <= 0:
        return []
    logits = model(list(prompt_ids), 0)
    out = [int(logits[-1].argmax())]
    while len(out) < max_new_tokens:
        out.append(int(model([out[-1]])[-1].argmax()))
    return out


def plain_dflash_generate(
    model: PlainModel, drafter: PlainDFlashDrafter, prompt_ids: Sequence[int], max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """Greedy DFlash draft/verify/accept (DESIGN §7) -> (new tokens, accepted drafts per step).

    Lossless: the tokens equal plain_greedy_generate's. After verifying [anchor, d1..] at p.., the
    target cache keeps p..p+a and the drafter context gets the hidden states of those a+1 tokens.
    """
    model.reset()
    drafter.reset()
    if max_new_tokens <= 0:
        return [], []
    logits, hidden = model(list(prompt_ids), 0, return_hidden=True)
    drafter.append_context(hidden, 0)
    out, accepts = [int(logits[-1].argmax())], []
    pos = len(prompt_ids)  # position of the anchor out[-1]
    while len(out) < max_new_tokens:
        drafts = drafter.draft_tokens(out[-1], pos)
        logits, hidden = model([out[-1]] + drafts, pos, return_hidden=True)
        post = logits.argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == post[a]:
            a += 1
        out += drafts[:a] + [post[a]]
        accepts.append(a)
        model.truncate(pos + a + 1)
        drafter.append_context({i: h[: a + 1] for i, h in hidden.items()}, pos)
        pos += a + 1
    return out[:max_new_tokens], accepts
