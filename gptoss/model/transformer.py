"""The GPT-OSS transformer in plain PyTorch: the reference path, written to be read top to bottom.

Parameter names follow the Hugging Face checkpoint (`model.layers.N.self_attn.q_proj.weight`, ...)
so that loading is one loop over `state_dict()`. The config's comparison fields (no biases or
sinks, QK-norm, Qwen3's router and SwiGLU, tied embeddings) drop or add parameters without
renaming the others. The three heavy ops (linear layers, the experts, attention) go through
`gptoss.kernels.ops`, which computes them by their PyTorch reference or a faster kernel; the model
never knows which. Split across ranks (`gptoss.distributed.Parallel`), each module holds its part of the
heads, experts and vocabulary rows and joins the partial results with one collective; single-process
those are no-ops. Shapes in comments use B batch, T new tokens, S keys, H hidden, Hq query heads, Hkv KV
heads (those of this rank), G = Hq / Hkv, D head_dim, E experts, I expert intermediate size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptoss.distributed import SINGLE, Parallel
from gptoss.kernels import ops
from gptoss.kernels.experts import Activation
from gptoss.model.config import ModelConfig
from gptoss.model.generation_config import GenerationConfig
from gptoss.quant import mxfp4
from gptoss.quant.int8 import Int8Weight


class RMSNorm(nn.Module):
    """Normalised in fp32 with an fp32 scale, then cast back, as both reference implementations do."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        return (t * self.weight).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear computed by `ops.linear`, whose weight can be replaced by int8 blocks (`hold_int8`:
    buffers weight_int8 and weight_scales)."""

    def hold_int8(self, weight: Int8Weight) -> None:
        del self.weight
        self.register_buffer("weight_int8", weight.values)
        self.register_buffer("weight_scales", weight.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = Int8Weight(self.weight_int8, self.weight_scales) if hasattr(self, "weight_int8") else self.weight
        return ops.linear(x, weight, self.bias)


class Embedding(nn.Embedding):
    """The token embedding, this rank's vocabulary rows of it: ids it does not hold look up zeros, and the
    sum over the ranks is each id's row."""

    def __init__(self, cfg: ModelConfig, parallel: Parallel):
        rows = parallel.part(cfg.vocab_size)
        super().__init__(len(rows), cfg.hidden_size)
        self.first_row, self.parallel = rows.start, parallel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.first_row
        held = (local >= 0) & (local < self.num_embeddings)
        x = super().forward(local.clamp(0, self.num_embeddings - 1)) * held.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.sum_partials(x)


class RotaryEmbedding(nn.Module):
    """RoPE with YaRN's "NTK by parts" frequencies and its attention concentration factor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_half = cfg.head_dim // 2
        # Explicit CPU device: the model is often built under `torch.device("meta")` and these are
        # not loaded from the checkpoint.
        freq = cfg.rope_theta ** (torch.arange(d_half, dtype=torch.float64, device="cpu") * 2 / cfg.head_dim)
        if cfg.rope_scaling_factor > 1.0:
            factor = cfg.rope_scaling_factor

            def correction_dim(beta: float) -> float:  # the dimension whose wavelength fits `beta` times
                return d_half * math.log(cfg.rope_original_context / (beta * 2 * math.pi)) / math.log(cfg.rope_theta)

            low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
            if cfg.rope_truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, d_half - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(d_half, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
            # ramp 0: fast dimensions keep their frequency; ramp 1: slow ones are interpolated by `factor`.
            inv_freq = (1 - ramp) / freq + ramp / (factor * freq)
            self.concentration = 0.1 * math.log(factor) + 1.0
        else:
            inv_freq = 1.0 / freq
            self.concentration = 1.0
        self.inv_freq = inv_freq.float()  # [D/2]; a plain attribute, moved with the positions

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, D/2] in fp32, already scaled by the concentration."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        return angles.cos() * self.concentration, angles.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; rotates the pairs (x[i], x[i + D/2]), the "halves" layout of GPT-OSS."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Attention over this rank's heads: its KV heads and the query heads that read them. o_proj holds
    the matching columns, so each rank's output is a partial sum of the whole; rank 0 adds the bias."""

    def __init__(self, cfg: ModelConfig, layer: int, parallel: Parallel = SINGLE):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads // parallel.size, cfg.num_kv_heads // parallel.size
        self.head_dim, self.parallel = cfg.head_dim, parallel
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.layer = layer
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias and parallel.rank == 0)
        if cfg.qk_norm:  # Qwen3: queries and keys normalised per head, so their dot products stay bounded
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        # One learned logit per query head, or none.
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if cfg.attention_sinks else None

    def forward(self, x, cos, sin, positions, cache=None):
        B, T, _ = x.shape
        Hkv, G, D = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = self.v_proj(x).view(B, T, Hkv, D)
        k_pos = positions
        if cache is not None:  # keys and values now span the cached context: [B, S, Hkv, D]
            k, v, k_pos = cache.update(self.layer, k, v)

        q = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)                # [B, Hkv, G, T, D]
        out = ops.attend(q, k, v, positions, k_pos, self.window, self.sinks)   # [B, Hkv, G, T, D]
        return self.parallel.sum_partials(self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(B, T, self.num_heads * D)))


class Experts(nn.Module):
    """E expert MLPs (`num_experts` of them: all, or this rank's), weights [E, out, in]: either dense
    parameters or MXFP4 blocks and scales, which stay packed (`ops.experts` decodes them where they are
    used)."""

    def __init__(self, cfg: ModelConfig, quantized: bool, num_experts: int | None = None):
        super().__init__()
        E, H, I = num_experts or cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.quantized = quantized
        self.activation = Activation(cfg.expert_activation, cfg.swiglu_alpha, cfg.swiglu_limit)
        for name, (rows, cols) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
            if quantized:
                self.register_buffer(f"{name}_blocks", torch.zeros(E, rows, cols // mxfp4.BLOCK, 16, dtype=torch.uint8))
                self.register_buffer(f"{name}_scales", torch.zeros(E, rows, cols // mxfp4.BLOCK, dtype=torch.uint8))
            else:
                self.register_parameter(name, nn.Parameter(torch.zeros(E, rows, cols)))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I)) if cfg.expert_bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H)) if cfg.expert_bias else None

    def weight(self, name: str) -> torch.Tensor | mxfp4.MXFP4Weight:
        """The [E, out, in] weight `name` ("gate_up_proj" or "down_proj"), dense or packed."""
        if self.quantized:
            return mxfp4.MXFP4Weight(getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"))
        return getattr(self, name)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids and expert_weights [N, k] -> [N, H], the weighted sum over the k experts."""
        return ops.experts(x, expert_ids, expert_weights, self.weight("gate_up_proj"), self.gate_up_proj_bias,
                           self.weight("down_proj"), self.down_proj_bias, self.activation)


class MoE(nn.Module):
    """The router over all experts (every rank routes every token) and this rank's experts: each token's
    routed experts run on the rank that holds them, and the partial outputs are summed over the ranks."""

    def __init__(self, cfg: ModelConfig, quantized_experts: bool, parallel: Parallel = SINGLE):
        super().__init__()
        self.top_k = cfg.experts_per_token
        self.softmax_first, self.normalize = cfg.router == "softmax_topk", cfg.normalize_topk
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.held, self.parallel = parallel.part(cfg.num_experts), parallel
        self.experts = Experts(cfg, quantized_experts, len(self.held))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])                                   # [N, H]
        logits = self.router(flat)                                          # [N, E]
        if self.softmax_first:  # Qwen3: probabilities over all experts, the k largest kept
            expert_weights, expert_ids = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
            if self.normalize:
                expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        else:
            top_logits, expert_ids = logits.topk(self.top_k, dim=-1)        # sorted, [N, k]
            expert_weights = top_logits.float().softmax(dim=-1)             # softmax over the k chosen only
        if self.parallel.size == 1:
            return self.experts(flat, expert_ids, expert_weights).view_as(x)
        # The (token, slot) pairs routed to this rank's experts, each computed as a one-expert token [P, H];
        # their weighted outputs summed per token in fp32, then over the ranks.
        token, slot = ((expert_ids >= self.held.start) & (expert_ids < self.held.stop)).nonzero(as_tuple=True)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        if token.numel():
            pairs = self.experts(flat[token], (expert_ids[token, slot] - self.held.start)[:, None],
                                 expert_weights[token, slot][:, None])
            out.index_add_(0, token, pairs.float())
        return self.parallel.sum_partials(out).to(x.dtype).view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, quantized_experts: bool, parallel: Parallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, parallel)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, quantized_experts, parallel)

    def forward(self, x, cos, sin, positions, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The whole model, or with `parallel` this rank's part of it (every rank computes every token; the
    logits of the whole vocabulary come out on every rank)."""

    def __init__(self, cfg: ModelConfig, quantized_experts: bool = False, parallel: Parallel = SINGLE):
        super().__init__()
        parallel.check(cfg)
        self.config, self.parallel = cfg, parallel
        # stop tokens and sampling defaults; the loader puts a checkpoint's generation_config.json here
        self.generation_config = GenerationConfig.for_model(cfg)
        self.model = nn.ModuleDict(dict(
            embed_tokens=Embedding(cfg, parallel),
            layers=nn.ModuleList(Block(cfg, i, quantized_experts, parallel) for i in range(cfg.num_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = Linear(cfg.hidden_size, len(parallel.part(cfg.vocab_size)), bias=False)
        if cfg.tie_embeddings:  # one [V, H] matrix both reads tokens in and scores them out
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg)
        self.kernels = False  # see use_kernels

    def use_kernels(self, enabled: bool = True) -> "Transformer":
        """Lets `gptoss.kernels.ops` take the C++ kernels where they apply (False: the PyTorch reference)."""
        self.kernels = enabled
        return self

    def int8_layers(self) -> list[Linear]:
        """The layers the optional int8 format applies to: the attention projections and the unembedding,
        which a decode step reads at 1.125 bytes a weight instead of 2 in int8 blocks. A tied unembedding
        stays as it is (it is also the embedding table)."""
        layers = [proj for block in self.model.layers for proj in
                  (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj)]
        return layers if self.config.tie_embeddings else layers + [self.lm_head]

    @property
    def kv_heads(self) -> int:
        """The KV heads this model (this rank's part of it) caches."""
        return self.config.num_kv_heads // self.parallel.size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32), or [B, 1, vocab] for the last token only.

        positions [B, T] default to 0..T-1, or continue each row of the cache when one is given (the
        `PagedBatch` of a `gptoss.generation.cache.KVCache`: it hands each layer its keys and values via
        `begin(positions)` and `update(layer, k, v)`). `last_only` skips the unembedding of every other
        position, which generation never reads.
        """
        if positions is None:
            if cache is not None:
                positions = cache.next_positions(input_ids.shape[1])
            else:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        if cache is not None:
            cache.begin(positions)
        with ops.using_kernels(self.kernels):
            cos, sin = self.rope(positions)
            x = self.model.embed_tokens(input_ids)
            for block in self.model.layers:
                x = block(x, cos, sin, positions, cache)
            if last_only:
                x = x[:, -1:]
            return self.parallel.gather_last_dim(self.lm_head(self.model.norm(x)).float())
