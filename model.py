"""
Qwen2 / Qwen2.5 decoder, written out by hand, plus the value head PPO's critic needs.

One file, read top to bottom:
  1. Qwen2Config  - read from an HF checkpoint's config.json (both the released Qwen2.5 spelling,
                    `rope_theta` / `torch_dtype`, and the transformers-5 spelling, `rope_parameters` / `dtype`).
  2. the modules  - RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, the decoder block.
                    Their attribute names equal the checkpoint's tensor names (model.layers.0.self_attn.q_proj...),
                    so loading is one strict `load_state_dict(..., assign=True)`: no renaming table.
  3. Qwen2ForCausalLM (the policy, the reference) and Qwen2Critic (the same backbone + Linear(hidden, 1)).
  4. load_model / save_model - safetensors in and out; the files we write load in transformers.

Numerics follow transformers' Qwen2 exactly: RMSNorm in fp32, non-interleaved ("rotate_half") RoPE computed in
fp32, biases on q/k/v only, torch's scaled_dot_product_attention. Deliberate simplifications: no sliding-window
attention (Qwen2.5 ships with it switched off; we refuse configs that switch it on), no RoPE scaling, no dropout.

Left padding: every forward may take `attention_mask` [B, S] (1 = real token, 0 = pad) covering the cached
tokens plus the new ones. Positions are counted over real tokens only, so a left-padded prompt sees exactly the
positions it would see alone.

The KV cache belongs to the sampler (rollout.KVCache); the model only uses the cache it is given, which must offer
  cache.length                 the number of positions already cached (the model adds T after each forward), and
  cache.update(layer, k, v)    store this layer's new keys and values [B, n_kv, T, head_dim] after the cached
                               ones and return all of them [B, n_kv, length + T, head_dim].
A static cache (fixed shapes for CUDA graphs: cache.static is True) instead gives the step's positions
(cache.positions [B, 1]) and the keys it may see (cache.key_mask [B, 1, 1, max_len]), and its update() returns the
whole preallocated cache; the model then ignores attention_mask.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


# ----------------------------------------------------------------------------------------------------------------
# 1. config

@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "Qwen2ForCausalLM"    # or "Qwen2Critic" for a saved value model

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json (is {path} a Hugging Face checkpoint folder?)")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, str(file))

    @classmethod
    def from_dict(cls, raw: dict, file: str = "config") -> "Qwen2Config":
        """A config.json's fields (or transformers' Qwen2Config.to_dict()); errors name `file`."""
        archs = raw.get("architectures") or []
        if raw.get("model_type") != "qwen2" or any(a not in ("Qwen2ForCausalLM", "Qwen2Critic") for a in archs):
            raise ValueError(f"{file}: model_type={raw.get('model_type')!r}, architectures={archs}; "
                             "only Qwen2ForCausalLM (model_type 'qwen2') is supported")
        if raw.get("use_sliding_window"):
            raise ValueError(f"{file}: use_sliding_window=true is not supported (Qwen2.5 ships with it off)")
        if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):   # older: null
            raise ValueError(f"{file}: head_dim != hidden_size / num_attention_heads is not supported")
        # transformers >= 5 writes rope_parameters={"rope_theta": ..., "rope_type": "default"} and "dtype";
        # the released Qwen2.5 checkpoints write "rope_theta" and "torch_dtype".
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{file}: rope scaling {rope} is not supported")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))  # 10000 is transformers' Qwen2 default
        try:
            return cls(
                vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"],
                num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
                rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                max_position_embeddings=raw.get("max_position_embeddings", 32768),
                torch_dtype=raw.get("dtype") or raw.get("torch_dtype") or "bfloat16",
                bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
                architecture=archs[0] if archs else "Qwen2ForCausalLM")
        except KeyError as e:
            raise ValueError(f"{file}: missing field {e.args[0]!r}") from None

    def to_json(self, architecture: str) -> dict:
        """The Qwen2.5 release spelling, which both transformers 4 and 5 read."""
        return {"architectures": [architecture], "model_type": "qwen2", "hidden_act": "silu",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings, "torch_dtype": self.torch_dtype,
                "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}


# ----------------------------------------------------------------------------------------------------------------
# 2. the modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # the variance is computed in fp32 even for a bf16 model, as in the reference
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """positions [B, T] (int) -> cos, sin [B, 1, T, head_dim], computed in fp32 then cast, as the reference."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq                # [B, T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]               # [B, 1, T, head_dim]: halves, not interleaved
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; rotates the pair (x[i], x[i + D/2]) by the angle of position * inv_freq[i]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # [B, H_kv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                                     # [B, H_kv, S, D]
        gqa = self.n_kv != self.n_head
        if gqa and T == 1:
            # One new token (a decode step): fold each key/value head's G query heads into the query-length axis,
            # [B, n_kv, G, D] against the cache [B, n_kv, S, D], so the cache is read as it is (never copied per
            # query head) and every SDPA kernel applies; the mask [B, 1, 1, S] broadcasts over the G rows.
            G = self.n_head // self.n_kv
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, G, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, self.n_head * self.head_dim))
        if gqa and mask is not None and q.is_cuda:
            # CUDA's memory-efficient kernel takes a mask but not enable_gqa; rather than fall back to the math
            # kernel's [B, H, T, S] fp32 matrices, give every query head its own copy of its key/value head
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
            gqa = False
        # mask None means plain causal attention; for one new token and no padding, attend to everything
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=gqa)                               # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_and_mask(attention_mask, T: int, past: int):
    """attention_mask [B, S=past+T] (1 real, 0 pad) -> positions [B, T] and a bool mask [B, 1, T, S].

    Positions count real tokens only (a left-padded row starts at 0 on its first real token). A query may see
    a key that is real and not in its future. A pad query would see nothing, which makes softmax NaN and the
    NaN leaks into real rows through later layers; so every query also sees itself (its output is ignored)."""
    attention_mask = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]      # [B, T]
    q_pos = torch.arange(past, past + T, device=attention_mask.device)[:, None]     # absolute query index
    k_pos = torch.arange(past + T, device=attention_mask.device)[None, :]
    mask = (k_pos <= q_pos)[None] & attention_mask[:, None, :]                    # causal & real key
    mask = mask | (k_pos == q_pos)[None]                                          # ... or itself
    return positions, mask[:, None]


def additive_mask(mask, dtype):
    """bool mask [B, 1, T, S] (True: may attend) -> the same as 0 / -inf in `dtype`, which SDPA adds to the scores.
    SDPA would turn a bool mask into this in every layer (and, for CUDA's memory-efficient kernel, copy it into
    storage whose rows are 16-byte aligned); built once here, with rows padded to a multiple of 16 elements, it is
    used as it is by every layer."""
    S = mask.shape[-1]
    padded = torch.full((*mask.shape[:-1], -(-S // 16) * 16), float("-inf"), dtype=dtype, device=mask.device)
    return padded[..., :S].masked_fill_(mask, 0.0)


def attention_kernels(device):
    """On CUDA let SDPA choose among the flash, memory-efficient and math kernels, never cuDNN's: cuDNN builds an
    execution plan for every new shape, and the decode step's key length is new at every step (0.2-1 s a plan, kept
    without bound). Process-wide; load_model calls it, as does common.init_distributed."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class Embedding(nn.Embedding):
    """nn.Embedding, whose random fill is skipped on the meta device: load_model builds the model there and the
    checkpoint replaces every weight, while normal_ on a meta tensor imports torch._dynamo (~2 s per process)."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class Qwen2Model(nn.Module):
    """The backbone: embeddings, decoder blocks, final norm. Returns hidden states [B, T, hidden]."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False     # recompute each block in backward: activations of 1 block, not L

    def forward(self, input_ids, attention_mask=None, kv_cache=None):
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if getattr(kv_cache, "static", False):  # a static decode step: the cache holds positions and key mask
            positions, mask = kv_cache.positions, kv_cache.key_mask
        elif attention_mask is None:        # no padding: positions past..past+T-1, plain causal attention
            positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            mask = None if past == 0 or T == 1 else positions_and_mask(
                torch.ones(B, past + T, device=input_ids.device), T, past)[1]
        else:
            assert attention_mask.shape == (B, past + T), \
                f"attention_mask {tuple(attention_mask.shape)} must cover cache + new tokens {(B, past + T)}"
            positions, mask = positions_and_mask(attention_mask, T, past)
        x = self.embed_tokens(input_ids)                                            # [B, T, hidden]
        if mask is not None:        # once per forward, not in every layer's SDPA call
            mask = additive_mask(mask, x.dtype)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# 3. the policy and the critic

class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, kv_cache=None, return_hidden=False, logits_from=0,
                logprobs_of=None, temperature=1.0):
        """input_ids [B, T] -> logits [B, T - logits_from, V] (and the final hidden states [B, T, hidden]).

        logits_from skips the LM head on the first positions (PPO needs logits on the response only).
        logprobs_of: tokens [B, T - logits_from]; then, instead of the logits, (log-probs of those tokens under
        softmax(logits / temperature), entropy of that distribution), both [B, T - logits_from] in fp32, computed
        a chunk of positions at a time (head_logprobs): the [B, T, V] logits are never held."""
        hidden = self.model(input_ids, attention_mask, kv_cache)
        if logprobs_of is not None:
            return head_logprobs(hidden[:, logits_from:], self.lm_head.weight, logprobs_of, temperature)
        logits = self.lm_head(hidden[:, logits_from:])
        return (logits, hidden) if return_hidden else logits


HEAD_CHUNK_BYTES = 1 << 28    # 256 MiB: the fp32 logits of one chunk of positions (~440 positions at V = 151,936)


def mm_fp32(a, b):
    """a @ b as an fp32 result. For bf16 inputs the product is accumulated in fp32 either way; on CUDA it is also
    returned in fp32 (out_dtype) rather than rounded to bf16 (which would move a logit of 30 by up to 0.125)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _mm_out_dtype_works(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()         # a CPU (or a torch before out_dtype) has no bf16 -> fp32 product: in fp32


def addmm_fp32_(acc, a, b):
    """acc += a @ b, with acc fp32 and a, b bf16 (or fp32): on CUDA accumulated in place (addmm with out_dtype, where
    this torch build does it right), without an [M, N] temporary in bf16 or fp32."""
    if not a.is_cuda or a.dtype == torch.float32:    # product, then sum: a fused addmm_ would round otherwise
        return acc.add_(mm_fp32(a, b))
    if _addmm_in_place_works(a.device):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.add_(mm_fp32(a, b))


_MM_OUT_DTYPE, _ADDMM_IN_PLACE = {}, {}


def _mm_out_dtype_works(device) -> bool:
    """Whether this torch has torch.mm(bf16, bf16, out_dtype=fp32) (older builds raise TypeError: then fp32 operands)."""
    if device not in _MM_OUT_DTYPE:
        ones = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        try:
            _MM_OUT_DTYPE[device] = torch.mm(ones, ones, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[device] = False
    return _MM_OUT_DTYPE[device]


def _addmm_in_place_works(device) -> bool:
    """Whether torch.addmm(fp32 acc, bf16, bf16, out_dtype=fp32, out=acc) runs and adds correctly here: older builds
    refuse an fp32 `acc` with bf16 factors. Probed once per device on 2 x 2 tensors."""
    if device not in _ADDMM_IN_PLACE and not _mm_out_dtype_works(device):
        _ADDMM_IN_PLACE[device] = False
    if device not in _ADDMM_IN_PLACE:
        acc, ones = torch.ones(2, 2, device=device), torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        try:
            torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
            _ADDMM_IN_PLACE[device] = bool((acc == 3).all())
        except torch.OutOfMemoryError:           # (a RuntimeError, but not this build's answer)
            raise
        except (RuntimeError, TypeError):
            _ADDMM_IN_PLACE[device] = False
    return _ADDMM_IN_PLACE[device]


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T / temperature) at `tokens`, and the entropy, one chunk of positions at a time. Backward
    recomputes each chunk's logits rather than keeping them: memory is one chunk's [chunk, V], not [N, V]."""

    @staticmethod
    def forward(ctx, hidden_nd, weight, tokens_nd, temperature, chunk):       # [..., H], [V, H], [...]
        hidden, tokens = hidden_nd.reshape(-1, hidden_nd.shape[-1]), tokens_nd.reshape(-1)      # [N, H], [N]
        out_lp = torch.empty(tokens_nd.shape, device=hidden.device)             # fp32, not a view (FSDP hooks)
        out_ent = torch.empty(tokens_nd.shape, device=hidden.device)
        logprobs, entropy = out_lp.view(-1), out_ent.view(-1)                   # [N]
        for a in range(0, len(hidden), chunk):
            z = mm_fp32(hidden[a:a + chunk], weight.T) / temperature            # [c, V] fp32, never rounded to bf16
            lse = torch.logsumexp(z, dim=-1)
            logprobs[a:a + chunk] = z.gather(-1, tokens[a:a + chunk, None]).squeeze(-1) - lse
            entropy[a:a + chunk] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)   # stable: no log of a tiny p
        ctx.save_for_backward(hidden_nd, weight, tokens_nd)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(out_ent)                                    # a metric
        return out_lp, out_ent

    @staticmethod
    def backward(ctx, grad_out, _):
        hidden_nd, weight, tokens_nd = ctx.saved_tensors
        hidden, tokens = hidden_nd.reshape(-1, hidden_nd.shape[-1]), tokens_nd.reshape(-1)
        grad_logprobs = grad_out.reshape(-1)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, device=weight.device)            # fp32 sum over the chunks
        for a in range(0, len(hidden), ctx.chunk):
            h, g_out = hidden[a:a + ctx.chunk], grad_logprobs[a:a + ctx.chunk]
            p = torch.softmax(mm_fp32(h, weight.T) / ctx.temperature, dim=-1)    # [c, V]
            # d logprob(token) / d z = onehot(token) - softmax(z); z = logits / temperature
            g = (-p * g_out[:, None]).scatter_add_(-1, tokens[a:a + ctx.chunk, None], g_out[:, None])
            g = (g / ctx.temperature).to(hidden.dtype)
            grad_hidden[a:a + ctx.chunk] = g @ weight
            addmm_fp32_(grad_weight, g.T, h)                                     # [V, H] += [V, c] @ [c, H]
        return grad_hidden.view(hidden_nd.shape), grad_weight.to(weight.dtype), None, None, None


def head_logprobs(hidden, weight, tokens, temperature=1.0, chunk=None):
    """hidden [..., H], LM-head weight [V, H], tokens [...] -> (log-prob of each token under softmax(h W^T / T),
    entropy), both [...] fp32; differentiable in the log-probs (hidden and weight), the entropy a metric."""
    chunk = chunk or max(1, HEAD_CHUNK_BYTES // (4 * weight.shape[0]))
    return _HeadLogprobs.apply(hidden, weight, tokens, float(temperature), chunk)


class Qwen2Critic(nn.Module):
    """PPO's value model: the same backbone with Linear(hidden, 1) in place of the LM head (as OpenRLHF)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.value_head = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, T] -> values [B, T] in fp32: values[:, t] estimates the return after token t."""
        hidden = self.model(input_ids, attention_mask)                                  # [B, T, hidden]
        # in fp32 also when the backbone computes in bf16: a value is one number, rounding it to bf16 costs 3 digits
        return F.linear(hidden.float(), self.value_head.weight[0].float())             # [B, T] fp32, not a view


# ----------------------------------------------------------------------------------------------------------------
# 4. safetensors in and out

def default_device_dtype(device=None, dtype=None):
    """bf16 on CUDA, fp32 on CPU (bf16 matmuls on CPU are two orders of magnitude slower)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def read_safetensors(path: Path, device, headers_only=False) -> dict[str, tuple[torch.Tensor | None, str]]:
    """All tensors of a checkpoint folder: name -> (tensor, file it came from); single file or sharded.
    headers_only: read no tensor (None in its place), only check that every file is whole - fast at any size."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: listed in {index.name} but missing")
        try:                                          # the header is checked to cover the file exactly
            with safe_open(path / name, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensors[key] = (None if headers_only else f.get_tensor(key), name)
        except (SafetensorError, OSError) as e:       # empty, truncated or not safetensors at all
            raise ValueError(f"{path / name}: not a readable safetensors file ({e})") from None
    return tensors


def load_model(path, dtype=None, device=None, value_head=False) -> nn.Module:
    """Build the model on the meta device and fill it from the checkpoint's safetensors.

    value_head=False: the policy (Qwen2ForCausalLM). value_head=True: the critic; from a base checkpoint its
    value head is freshly initialised (normal, std 1/(hidden+1), as OpenRLHF), from a critic checkpoint it loads."""
    path = Path(path)
    config = Qwen2Config.from_json(path)
    if config.architecture == "Qwen2Critic" and not value_head:
        raise ValueError(f"{path}: is a critic checkpoint (Qwen2Critic), not a Qwen2ForCausalLM policy; "
                         "load it with value_head=True")
    device, dtype = default_device_dtype(device, dtype)
    attention_kernels(device)
    with torch.device("meta"):
        model = (Qwen2Critic if value_head else Qwen2ForCausalLM)(config)
    tensors = read_safetensors(path, device)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)        # tied: the LM head is the embedding matrix
        tensors.pop("lm_head.weight", None)         # (some exports store the copy anyway)
    if value_head:
        tensors.pop("lm_head.weight", None)         # a base checkpoint's LM head is not the critic's
        if "value_head.weight" not in tensors:
            std = 1.0 / (config.hidden_size + 1)
            tensors["value_head.weight"] = (torch.randn(1, config.hidden_size, device=device) * std, "(new)")
    for name, (t, file) in tensors.items():
        if name not in expected:
            raise ValueError(f"{path / file}: unexpected tensor {name!r} for this config")
        if t.shape != expected[name]:
            raise ValueError(f"{path / file}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"config.json implies {tuple(expected[name])}")
    for name in expected:
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing from the checkpoint's safetensors")
    state = {name: t.to(dtype) for name, (t, _) in tensors.items()}
    tied = config.tie_word_embeddings and not value_head
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight     # assign=True made two Parameters: share one
    return model.eval()


def init_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised policy (the CPU demo's starting point): normal(0, 0.02) weights, zero biases,
    unit norms, as transformers initialises Qwen2."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    for name, p in model.named_parameters():
        if "norm" in name:
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=0.02)
    return model


def save_model(model: nn.Module, path, state_dict: dict | None = None):
    """Write config.json + model.safetensors (HF layout; transformers' from_pretrained loads the policy).

    state_dict: pass a full (gathered) state dict when the model itself is sharded. Files are written under a
    temporary name and renamed, so a crash never leaves a half-written checkpoint in place."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: Qwen2Config = model.config
    state = dict(state_dict if state_dict is not None else model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)           # stored once, as in the released checkpoints
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtype = next(iter(state.values())).dtype
    config_json = config.to_json("Qwen2Critic" if isinstance(model, Qwen2Critic) else "Qwen2ForCausalLM")
    config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(state, path / "model.safetensors.tmp", metadata={"format": "pt"})
    (path / "config.json.tmp").write_text(json.dumps(config_json, indent=2))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    os.replace(path / "config.json.tmp", path / "config.json")
    stale_index = path / "model.safetensors.index.json"
    if stale_index.exists():                        # an older sharded export would shadow the new file
        stale_index.unlink()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
