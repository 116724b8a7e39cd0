"""The phi-3 decoder, written to be read in one sitting.

It matches ``transformers.Phi3ForCausalLM`` weight for weight (same parameter names and shapes: fused
``qkv_proj``, fused ``gate_up_proj``, RMSNorm, RoPE / LongRoPE), so its checkpoints load in transformers and
vLLM (see ``phi3data.model.hf``). phi-3-small's differences are options of the same model: grouped-query
attention (``num_key_value_heads``), the GEGLU activation with a clamp limit, muP multipliers and alternating
dense / blocksparse attention layers. Configs using those options are not ``Phi3ForCausalLM``-compatible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phi3data.config import ConfigError, check_keys
from phi3data.model.attention import blocksparse_attention, causal_mask, reference_attention, sdpa_attention


@dataclass
class Phi3Config:
    """Model hyper-parameters. Field names follow Hugging Face's ``Phi3Config`` where one exists."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # LongRoPE: {"type": "longrope", "short_factor": [...], "long_factor": [...]} (each head_dim/2 floats)
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5  # the epsilon of either norm type
    norm_type: str = "rmsnorm"  # "rmsnorm" (phi-3) or "layernorm" (phi-3-small: LayerNorm with bias)
    linear_bias: bool = False  # biases on qkv/o and the MLP projections (phi-3-small)
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"  # "silu" (phi-3 SwiGLU) or "gegelu" (phi-3-small GEGLU with a clamp)
    gegelu_limit: float = 20.0
    # muP (phi-3-small): embeddings * embedding_multiplier, logits / width_multiplier,
    # attention scale attn_multiplier / head_dim (instead of 1/sqrt(head_dim)) when mup_use_scaling.
    mup_embedding_multiplier: float = 1.0
    mup_width_multiplier: float = 1.0
    mup_attn_multiplier: float = 1.0
    mup_use_scaling: bool = False
    # phi-3-small blocksparse attention; a layer is dense when layer_idx % dense_attention_every_n_layers == 0
    blocksparse: bool = False
    dense_attention_every_n_layers: int = 2
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    attn_impl: str = "sdpa"  # dense layers: "sdpa" or "reference"; blocksparse layers: see blocksparse_impl
    blocksparse_impl: str = "auto"  # "auto", "reference", "sdpa", "flex", "triton"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 32000
    pad_token_id: int | None = 32000
    name: str = "phi3"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act not in ("silu", "gegelu"):
            raise ValueError(f"hidden_act must be 'silu' or 'gegelu', got {self.hidden_act!r}")
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {self.norm_type!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind in ("su", "yarn"):
                kind = "longrope"
            if kind != "longrope":
                raise ValueError(f"only longrope rope_scaling is supported, got {kind!r}")
            for key in ("short_factor", "long_factor"):
                if len(self.rope_scaling[key]) != self.head_dim // 2:
                    raise ValueError(f"rope_scaling.{key} needs head_dim/2 = {self.head_dim // 2} entries")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def hf_compatible(self) -> bool:
        """True when the config is plain phi-3 (loadable as transformers' Phi3ForCausalLM)."""
        return (
            self.hidden_act == "silu"
            and self.norm_type == "rmsnorm"
            and not self.linear_bias
            and not self.blocksparse
            and not self.mup_use_scaling
            and self.mup_embedding_multiplier == 1.0
            and self.mup_width_multiplier == 1.0
        )

    def is_blocksparse_layer(self, layer_idx: int) -> bool:
        return self.blocksparse and layer_idx % self.dense_attention_every_n_layers != 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_names(cls, d: dict[str, Any], where: str, prefix: str = "") -> None:
        """Refuse keys that are not fields, suggesting the close name (a :class:`ConfigError`)."""
        check_keys([prefix + k for k in d], [prefix + k for k in cls.field_names()], where)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model config", prefix: str = "") -> Phi3Config:
        """Build from a recipe's fields; an unknown (misspelt) or invalid field is a :class:`ConfigError`.

        ``where`` names the source (a file, "overrides") and ``prefix`` the table, e.g. ``"model."``, so the
        message reads ``model/x.toml: unknown field model.hiden_size (did you mean model.hidden_size?)``.
        """
        cls.check_names(d, where, prefix)
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def from_checkpoint_dict(cls, d: dict[str, Any]) -> Phi3Config:
        """Build from a saved checkpoint's config, leniently: keys this version does not know go to ``extra``."""
        names = set(cls.field_names())
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        if unknown:
            known["extra"] = {**known.get("extra", {}), **unknown}
        return cls(**known)


def num_parameters(cfg: Phi3Config) -> dict[str, int]:
    """Parameter counts computed from the config alone: total and non-embedding (without embeddings / lm_head)."""
    h, d, kv = cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads
    qkv = cfg.num_attention_heads * d + 2 * kv * d
    attn = h * qkv + cfg.num_attention_heads * d * h
    mlp = h * 2 * cfg.intermediate_size + cfg.intermediate_size * h
    biases = qkv + h + 2 * cfg.intermediate_size + h if cfg.linear_bias else 0
    norm = 2 * h if cfg.norm_type == "layernorm" else h
    per_layer = attn + mlp + biases + 2 * norm
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    non_embedding = cfg.num_hidden_layers * per_layer + norm
    return {"total": non_embedding + embed + head, "non_embedding": non_embedding}


def _chunk_loss(
    xc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor, scale: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row chunk: (fp32 logits, summed loss, mask of trained rows, targets with ignored ones set to 0)."""
    logits = (xc @ w.t()).float() * scale
    lse = torch.logsumexp(logits, dim=-1)
    ok = tc != ignore_index
    safe_t = torch.where(ok, tc, 0)
    loss = ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * ok).sum()
    return logits, loss, ok, safe_t


def chunked_linear_cross_entropy(
    x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int, chunk: int
) -> torch.Tensor:
    """The loss of :class:`ChunkedLinearCrossEntropy` alone, without its gradients (evaluation, no_grad)."""
    valid = (targets != ignore_index).sum().clamp(min=1)
    loss = torch.zeros((), device=x.device, dtype=torch.float32)
    for i in range(0, targets.numel(), chunk):
        loss += _chunk_loss(x[i : i + chunk], w, targets[i : i + chunk], scale, ignore_index)[1]
    return loss / valid


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``(x @ w.T) * scale`` against ``targets``, computed in row chunks.

    The full (tokens x vocab) fp32 logits are never materialized: each chunk's logits give its loss and, right
    away, its gradients (softmax - one-hot), which are kept for the backward pass. Saves memory and several
    passes over the largest activation of a small model. Without gradients, use
    :func:`chunked_linear_cross_entropy`, which skips the gradient work; a frozen ``w`` (a VLM's stage 1) skips the
    weight's gradient matmul.
    """

    @staticmethod
    def forward(ctx, x, w, targets, scale, ignore_index, chunk):
        n = targets.numel()
        valid = (targets != ignore_index).sum().clamp(min=1)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for i in range(0, n, chunk):
            xc, tc = x[i : i + chunk], targets[i : i + chunk]
            rows = torch.arange(len(tc), device=x.device)
            ok = tc != ignore_index
            safe_t = torch.where(ok, tc, 0)
            # one fp32 buffer, updated in place: logits - max, then exp, then the softmax's gradient (fewer passes
            # over the largest activation than logsumexp + softmax + scaling as separate ops)
            g = (xc @ w.t()).float()
            if scale != 1.0:
                g.mul_(scale)
            g.sub_(g.amax(dim=-1, keepdim=True))
            target_logit = g[rows, safe_t]
            g.exp_()
            total = g.sum(dim=-1)
            loss += ((total.log() - target_logit) * ok).sum()
            weight = ok.float() * scale / valid
            g.mul_((weight / total)[:, None])
            g[rows, safe_t] -= weight
            g = g.to(x.dtype)
            torch.mm(g, w, out=grad_x[i : i + chunk])
            if grad_w is None:
                pass
            elif grad_w.dtype == xc.dtype:
                grad_w.addmm_(g.t(), xc)
            else:
                grad_w += (g.t() @ xc).float()
        ctx.weight_grad = grad_w is not None
        ctx.save_for_backward(grad_x, grad_w.to(w.dtype) if grad_w is not None else grad_x.new_zeros(0))
        return loss / valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out if ctx.weight_grad else None, None, None, None, None


def _fill(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size tensor into ``param``, or its local shard where FSDP has sharded it (a DTensor)."""
    full = full.to(device=param.device, dtype=param.dtype)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: Phi3Config) -> nn.Module:
    if cfg.norm_type == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Rotary(nn.Module):
    """RoPE, with LongRoPE's per-frequency short/long factors and attention scaling when configured."""

    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.original_max = cfg.original_max_position_embeddings
        self.scaling = 1.0
        if cfg.rope_scaling is not None:
            factor = cfg.rope_scaling.get("factor") or cfg.max_position_embeddings / self.original_max
            attention_factor = cfg.rope_scaling.get("attention_factor")
            if attention_factor is None:
                attention_factor = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
                )
            self.scaling = attention_factor
        short, long = self._inverse_frequencies()
        self.register_buffer("inv_freq_short", short, persistent=False)
        self.register_buffer("inv_freq_long", long, persistent=False)

    def _inverse_frequencies(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, d = self.cfg, self.cfg.head_dim
        base = cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
        if cfg.rope_scaling is None:
            short = long = torch.ones(d // 2)
        else:
            short = torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float32)
            long = torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float32)
        return 1.0 / (short * base), 1.0 / (long * base)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the frequencies in place (after ``to_empty`` of a model built on the meta device)."""
        short, long = self._inverse_frequencies()
        self.inv_freq_short.copy_(short)
        self.inv_freq_long.copy_(long)

    def forward(self, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq_long if t > self.original_max else self.inv_freq_short
        pos = torch.arange(t, device=inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.blocksparse = cfg.is_blocksparse_layer(layer_idx)
        if cfg.mup_use_scaling:
            self.scale = cfg.mup_attn_multiplier / self.head_dim
        else:
            self.scale = self.head_dim**-0.5
        bias = cfg.linear_bias
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cfg = self.cfg
        if mask is not None:  # packed documents: (B, 1, T, T), causal and inside each document
            if self.blocksparse:
                raise ValueError("packed-document attention is not supported on blocksparse layers")
            y = sdpa_attention(q, k, v, self.scale, mask=mask)
        elif self.blocksparse:
            y = blocksparse_attention(
                q,
                k,
                v,
                self.scale,
                cfg.blocksparse_block_size,
                cfg.blocksparse_num_local_blocks,
                cfg.blocksparse_vert_stride,
                cfg.blocksparse_homo_head_pattern,
                impl=cfg.blocksparse_impl,
            )
        elif cfg.attn_impl == "reference":
            y = reference_attention(q, k, v, causal_mask(t, cfg.sliding_window, device=x.device), self.scale)
        else:
            y = sdpa_attention(q, k, v, self.scale, sliding_window=cfg.sliding_window)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, q_size))


def gegelu(x: torch.Tensor, limit: float) -> torch.Tensor:
    """phi-3-small's GEGLU: interleaved (gelu, linear) pairs, clamped, quick-gelu gate, ``linear + 1``."""
    a_gelu, a_linear = x[..., ::2], x[..., 1::2]
    a_gelu = a_gelu.clamp(max=limit)
    a_linear = a_linear.clamp(min=-limit, max=limit)
    return a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_linear + 1)


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.act, self.limit = cfg.hidden_act, cfg.gegelu_limit
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.linear_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.act == "gegelu":
            return self.down_proj(gegelu(h, self.limit))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder blocks and the final norm (``model.*`` in Hugging Face names)."""

    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = make_norm(cfg)


class Phi3(nn.Module):
    """phi-3 causal language model. ``forward(idx)`` returns ``(logits, None)``; ``forward(idx, targets)``
    returns ``(None, loss)`` through the chunked lm_head + cross-entropy (``fused_loss=False``: ``(logits, loss)``).
    """

    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.cfg = cfg
        # the layers' default init is overwritten by init_weights: keep its draws off the global RNG, so a
        # (meta-device) build that skips them initialises from the same random state
        with torch.random.fork_rng(devices=[]):
            self.model = Backbone(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg)
        self.fused_loss = True  # chunked lm_head + cross-entropy when targets are given
        self.loss_chunk = 1024
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every weight: N(0, initializer_range) for linear and embedding weights, zero biases, unit norms.

        Values are drawn whole on the CPU, module by module, from ``generator`` (default: torch's global one), so
        a model built on the meta device, sharded (FSDP) and materialised with ``to_empty`` gets, from the same
        seed, the same weights as one built whole: ``torch.manual_seed(s); Phi3(cfg)``.
        """
        if self.cfg.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = self.model.embed_tokens.weight  # to_empty from the meta device unties them
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                full = torch.empty(module.weight.shape, dtype=torch.float32)
                _fill(module.weight, full.normal_(0.0, std, generator=generator))
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                _fill(module.weight, torch.ones(module.weight.shape))
            bias = getattr(module, "bias", None)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and bias is not None:
                _fill(bias, torch.zeros(bias.shape))
        self.rotary.reset_buffers()

    def forward(
        self, idx: torch.Tensor | None, targets: torch.Tensor | None = None, ignore_index: int = -100,
        documents: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``documents`` (B, T): the document number of each position (packed SFT data); attention then stays
        inside each document. ``inputs_embeds`` (B, T, hidden): input vectors used instead of
        ``embed_tokens(idx)`` (a VLM's token embeddings with image features scattered in); the muP embedding
        multiplier applies to them too."""
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        mask = None
        if documents is not None:
            mask = causal_mask(t, self.cfg.sliding_window, device=x.device)[None, None] & (
                documents[:, None, :, None] == documents[:, None, None, :])
        if self.cfg.mup_embedding_multiplier != 1.0:
            x = x * self.cfg.mup_embedding_multiplier
        cos, sin = self.rotary(t, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, mask)
        x = self.model.norm(x)
        if targets is not None and self.fused_loss:
            # training: loss without materializing logits (logits are returned as None)
            w = self.lm_head.weight
            if torch.is_autocast_enabled(x.device.type):
                w = w.to(torch.get_autocast_dtype(x.device.type))
                x = x.to(w.dtype)
            args = (
                x.reshape(-1, x.shape[-1]),
                w,
                targets.reshape(-1),
                1.0 / self.cfg.mup_width_multiplier,
                ignore_index,
                self.loss_chunk,
            )
            if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
                return None, ChunkedLinearCrossEntropy.apply(*args)
            return None, chunked_linear_cross_entropy(*args)  # evaluation: the loss without gradient work
        logits = self.lm_head(x)
        if self.cfg.mup_width_multiplier != 1.0:
            logits = logits / self.cfg.mup_width_multiplier
        loss = None
        if targets is not None:
            # sum / count rather than "mean": a batch whose targets are all masked gives 0, not NaN (0 / 0)
            valid = (targets != ignore_index).sum().clamp(min=1)
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                reduction="sum",
            ) / valid
        return logits, loss

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.cfg.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * non-embedding-and-head params + attention (12 * L * H * T_eff)."""
        n = self.num_parameters(non_embedding=True) + self.cfg.vocab_size * self.cfg.hidden_size
        attn = 12 * self.cfg.num_hidden_layers * self.cfg.hidden_size * seq_len / 2  # causal: half the pairs
        return 6 * n + attn
