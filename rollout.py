"""
KV-cached sampling for a batch of prompts of unequal lengths: PPO's rollout.

    result = generate(model, prompts, max_new_tokens=1024, temperature=1.0, eos_token_id=151643, generator=g)
    result.responses[i]  # sampled token ids of prompt i (ending with the EOS when it stopped on one)
    result.logprobs[i]   # log-prob of each sampled token (equal to a fresh forward's: PPO's "old" log-probs)
    result.finished[i]   # stopped on EOS (False: ran out of max_new_tokens, i.e. truncated)

How it works:
  - prompts are left-padded to a common length, so every row's next token is written at the same column;
    the padding mask gives each row its own positions (counted over real tokens) and hides the pads;
  - one prefill forward fills a preallocated (static) KV cache; then one forward per new token, each writing a
    single cache slot - nothing is reallocated or re-concatenated while decoding;
  - the LM head runs on the last position only (the prompt's other logits are never needed here);
  - the random numbers of all steps are drawn up front, one [max_new_tokens, B, 1] tensor from `generator`;
  - with static=True every decode step has the same shapes (the whole cache, its unwritten slots masked; the
    positions and key mask as tensors updated in place), so that on a GPU the step can be captured once as a CUDA
    graph (cuda_graph=True) and replayed; it reads the same random numbers, so it samples the same tokens (up to
    rounding: attention over the whole masked cache sums in another order);
  - on CPU, every Linear runs through oneDNN with its weight packed once per rollout (see packed_linears):
    decoding a batch of 8 multiplies [8, hidden] by each weight, a shape where the default (MKL) path reaches
    a third of the speed; the packed path is 2-4x faster and equal within fp32 rounding.

The log-probs are those of the temperature-scaled distribution, log_softmax(logits / temperature), which is
what a fresh training forward recomputes for the same tokens (train.py does recompute them, so that bf16
decoding drift never enters PPO's ratio, and logs the gap). With top_p < 1 the token is drawn from the
renormalised nucleus, but the reported log-prob is still of the untruncated distribution (what PPO's ratio
compares against); keep top_p = 1 for training, as Med-RLVR does. Temperature 0 is greedy decoding, and then
the log-probs are those of the plain softmax.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


class KVCache:
    """A preallocated (static) cache: k, v [L, B, n_kv, max_len, head_dim]; `length` slots are filled.

    Allocated once per rollout, so decoding never reallocates or concatenates: each step writes one slot. The model
    calls update() in every layer and advances `length` after each forward (model.py's docstring)."""

    def __init__(self, config, batch: int, max_len: int, device, dtype, static=False):
        head_dim = config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, head_dim)
        # static: zeros, since a static step attends over every slot (the unwritten ones masked: weight 0, and
        # 0 * a NaN left in empty memory would still be NaN)
        self.k = (torch.zeros if static else torch.empty)(shape, device=device, dtype=dtype)
        self.v = (torch.zeros if static else torch.empty)(shape, device=device, dtype=dtype)
        self.length = 0
        self.static = False

    def go_static(self, key_mask, positions):
        """From now on one token a step at slot self.index (a tensor), over the whole cache (model.py's docstring):
        key_mask [B, 1, 1, max_len] and positions [B, 1] are updated in place by the caller."""
        self.static, self.key_mask, self.positions = True, key_mask, positions
        self.index = torch.tensor([self.length], device=self.k.device)

    def update(self, layer: int, k, v):
        """Write k, v [B, n_kv, T, D] after the filled slots; return all keys and values so far."""
        if self.static:                        # fixed shapes: write at a tensor index, hand back the whole cache
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass
class Rollout:
    responses: list[list[int]]
    logprobs: list[torch.Tensor]   # each 1-D float32, one entry per response token
    finished: list[bool]


def sample(logits, temperature: float, top_p: float, generator=None, u=None):
    """logits [B, V] (fp32) -> (tokens [B], logprobs [B]) under the temperature-scaled distribution. u: the step's
    uniform numbers [B, 1] (fp64) if drawn already, else they are drawn from generator."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)                     # [B, V]
    probs = logprobs.exp()
    if top_p < 1.0:
        # nucleus: keep the most likely tokens whose cumulative probability reaches top_p (at least one)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p                          # mass before it already >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    # Inverse-CDF sampling: one uniform number per row, found in the cumulative distribution. Exact, and ~10x
    # cheaper on CPU than torch.multinomial, which draws a random number for every vocabulary entry.
    cdf = probs.double().cumsum(-1)                                                # [B, V], fp64: no drift
    u = (torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=cdf.dtype) if u is None else u) \
        * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1)                    # first cdf > u: p > 0
    tokens = tokens.clamp(max=cdf.shape[-1] - 1)                                   # guards u == total
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


@contextmanager
def packed_linears(model: nn.Module):
    """On CPU, swap each nn.Linear's forward for oneDNN's linear on a pre-packed copy of its weight.

    The copies live only for the rollout (the training weights are untouched, and reading them back is the
    point of the next rollout re-packing them). Elsewhere (CUDA, bf16, a torch without oneDNN) it does nothing."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    w = linears[0].weight        # fp32 only: oneDNN's bf16 path needs AVX-512 or AVX-NE-CONVERT, which CPUs may lack
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        yield
        return
    try:
        for m in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 8)   # 8: decode batch hint
            m.forward = (lambda x, w=packed, b=m.bias:
                         torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)    # back to nn.Linear.forward


def capture(step):
    """step() captured as a CUDA graph (after two warm-up runs on a side stream, as torch.cuda.graphs asks); the
    returned function replays it and returns the same output tensor, refilled."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out
    return replay


@torch.no_grad()
def draw_uniforms(max_new_tokens: int, batch: int, generator, device):
    """The random numbers of every decode step, drawn up front in one call -> [N, B, 1] (fp64): the default and the
    static path read the same stream, so they sample the same tokens up to the order of their sums (drawn step by
    step, CUDA's Philox generator would give other numbers)."""
    return torch.rand(max_new_tokens, batch, 1, generator=generator, device=device, dtype=torch.float64)


@torch.no_grad()          # sampling needs no gradients (with them, oneDNN's packed LM head takes a path ~500x slower)
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_id: int | list[int], generator: torch.Generator | None = None,
             static: bool = False, cuda_graph: bool = False) -> Rollout:
    """static: every decode step has the same shapes (the whole cache, masked; positions as tensors), the same
    tokens as the default path (tested). cuda_graph (with static, on a GPU): the step is captured once as a CUDA
    graph and replayed, no Python or kernel-launch overhead per layer."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)

    # Left padding. Pad id 0 is arbitrary: pads are hidden by the mask, never by their id (Qwen's EOS is its pad).
    input_ids = torch.zeros(B, P, dtype=torch.long, device=device)
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)    # [B, S]: 1 = real token
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):P] = 1
    cache = KVCache(model.config, B, P + max_new_tokens, device, model.lm_head.weight.dtype, static=static)
    step = None
    if static:                                   # everything a step reads, at fixed addresses
        key_mask = mask.bool()[:, None, None, :].clone()                          # [B, 1, 1, S]
        positions = mask.sum(-1, keepdim=True)                                     # [B, 1]: prompt lengths
        token_in = torch.zeros(B, 1, dtype=torch.long, device=device)
    uniforms = None if temperature == 0 else draw_uniforms(max_new_tokens, B, generator, device)   # [N, B, 1]

    tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)      # [B, N]
    logprobs = torch.zeros(B, max_new_tokens, device=device)                       # [B, N]
    lengths = torch.full((B,), max_new_tokens, device=device)                      # response length per row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with packed_linears(model):
        logits = model(input_ids, mask[:, :P], cache, logits_from=-1)[:, -1]       # prefill -> [B, V]
        if static:
            cache.go_static(key_mask, positions)
            step = lambda: model(token_in, None, cache)[:, -1]                      # noqa: E731
            if cuda_graph and device.type == "cuda":
                step = capture(step)
        for t in range(max_new_tokens):
            token, logprob = sample(logits.float(), temperature, top_p, u=None if uniforms is None else uniforms[t])
            tokens[:, t], logprobs[:, t] = token, logprob
            # A finished row keeps riding along in the batch (its later tokens are computed and thrown away):
            # rows never attend to each other, so this cannot disturb the others, and the batch keeps its shape.
            newly_done = ~done & torch.isin(token, eos)
            lengths = torch.where(newly_done, t + 1, lengths)
            done |= newly_done
            # Asking whether every row is done makes the host wait for the device: on a GPU ask every 16 steps
            # (the extra steps only extend finished rows, which are cut at their length anyway)
            if t == max_new_tokens - 1 or ((t % 16 == 15 or device.type != "cuda") and bool(done.all())):
                break
            mask[:, P + t] = 1
            if static:                                   # in place: the step's inputs keep their addresses
                key_mask[:, 0, 0, P + t] = True
                cache.index.fill_(P + t)
                token_in.copy_(token[:, None])
                logits = step()
                positions += 1
            else:
                logits = model(token[:, None], mask[:, :P + t + 1], cache)[:, -1]

    tokens, logprobs, lengths, done = tokens.cpu(), logprobs.float().cpu(), lengths.tolist(), done.tolist()
    return Rollout(responses=[tokens[i, :n].tolist() for i, n in enumerate(lengths)],
                   logprobs=[logprobs[i, :n] for i, n in enumerate(lengths)],
                   finished=done)
