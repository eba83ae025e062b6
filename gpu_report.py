"""
The GPU report, `python bench.py --device cuda` (bench.py parses the flags): nothing needed outside the repository
(random weights, the demo's tokenizer); a line per result as it comes, every number in one JSON file (--report):
  1. parity: bf16 logits of the Qwen2.5-0.5B shape, ours and transformers', against transformers in fp32 (the twins
     are built from one config and agree in fp32); which SDPA kernels prefill, padded forward and decoding run (no
     cuDNN); the chunked LM head's bf16 log-probs and gradients against fp32;
  2. rollout: tokens/s against transformers' generate on the Qwen2.5-3B shape (batch 64, 128-token prompts, 512 new
     tokens, sampling); the default decode step and the static step captured as a CUDA graph (train.py
     --cuda-graphs), each against the bandwidth floor (weights + the KV cache each reads a step) at the measured
     copy bandwidth and the data sheet's; that both sample the same tokens from the same seed up to near ties
     (graph_divergence: bitwise equality between two kernel paths is not something any machine promises);
  3. ppo: three steps of the med-rlvr preset scaled down (0.5B shape, rollout batch 64, 256 new tokens): seconds
     per phase, peak memory, the step's model FLOPs (each model's own) and utilisation of the GPU named;
  4. training: train.py on a small random Qwen2, 2 steps straight and 1 + --resume 1, with and without
     --cuda-graphs: pass / fail for finite metrics and resume (exact, or within a stated tolerance).
Each section is time-boxed (SECTION_SECONDS, under 8 minutes in all); one that fails is reported and skipped. At the
end one line per section says PASS or FAIL with the figures and limits that decided it, and the command exits
non-zero when any section failed.
"""
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common
import model as M
import rollout as R


SHAPES = {"0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
          "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2),
          "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)}
# The data sheets' dense bf16 tensor-core FLOP/s and HBM bandwidth (bytes/s), by device name: the first match wins.
GPU_SPECS = [("H200 NVL", 835e12, 4.8e12), ("H200", 989e12, 4.8e12), ("H100 NVL", 835e12, 3.9e12),
             ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12), ("A100-SXM4-80GB", 312e12, 2.039e12),
             ("A100 80GB PCIe", 312e12, 1.935e12), ("A100", 312e12, 1.555e12)]
SECTION_SECONDS = {"parity": 60, "rollout": 150, "ppo": 120, "training": 120}   # time boxes: 7.5 minutes in all


def twin_models(shape, vocab, dtype, device):
    """transformers' Qwen2 with random weights, and ours sharing the very same tensors. Both come from one config:
    transformers' (with Qwen2.5's rope theta), ours read from its every field (Qwen2Config.from_dict); the module
    names are the checkpoint's, so one strict load_state_dict with assign=True."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2ForCausalLM(config).to(dtype)
    M.attention_kernels(device)
    with torch.device("meta"):
        ours = M.Qwen2ForCausalLM(M.Qwen2Config.from_dict(config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf.eval(), ours.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_bandwidth(device, nbytes=1 << 30):
    """Bytes moved per second by a large tensor copy on `device` (it reads and writes each byte): best of 5."""
    src, dst = torch.ones(nbytes // 4, device=device), torch.empty(nbytes // 4, device=device)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def attention_kernels_run(fn) -> str:
    """The SDPA kernels fn() ran, by the names of the aten ops the profiler records (flash / efficient / cudnn /
    math; on a CPU flash_attention_for_cpu)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key.removeprefix("aten::_scaled_dot_product_") for e in prof.key_averages()
             if e.key.startswith("aten::_scaled_dot_product_")}
    return ", ".join(sorted(names)) or "none"


def say(text):
    print(text, flush=True)


def report_parity(device, tiny):
    """bf16 logits of ours and transformers' against transformers in fp32; the attention kernels each kind of
    forward runs; the chunked LM head's bf16 log-probs and gradients against fp32."""
    shape, vocab = ("tiny", 1000) if tiny else ("0.5B", 151936)
    hf32, ours32 = twin_models(shape, vocab, torch.float32, device)
    x = torch.randint(0, vocab, (4, 128), device=device)
    with torch.no_grad():
        ref = hf32(x).logits.float()
        twins = (ours32(x) - ref).abs().max().item()
        del hf32, ours32
        hf16, ours16 = twin_models(shape, vocab, torch.bfloat16, device)
        err_hf = (hf16(x).logits.float() - ref).abs().max().item()
        err_ours = (ours16(x).float() - ref).abs().max().item()
    ok = err_ours <= 1.5 * err_hf + 1e-3
    say(f"1. {shape} shape, 4 x 128 tokens, max |logit error| against transformers fp32: ours fp32 {twins:.2e} (the "
        f"twins agree), ours bf16 {err_ours:.4f}, transformers bf16 {err_hf:.4f} ({'OK' if ok else 'LARGER'})")
    pad = torch.ones_like(x)
    pad[:, :7] = 0                                                             # left padding: the mask path
    with torch.no_grad():
        kernels = {"prefill": attention_kernels_run(lambda: ours16(x)),
                   "padded": attention_kernels_run(lambda: ours16(x, attention_mask=pad)),
                   "decode": attention_kernels_run(lambda: R.generate(ours16, x[:, :16].tolist(), 2, temperature=0,
                                                                      eos_token_id=vocab + 1))}
    say(f"   attention kernels: causal prefill {kernels['prefill']}; padded forward {kernels['padded']}; decoding "
        f"{kernels['decode']}" + ("" if "cudnn" not in str(kernels) else "  (cuDNN: NOT EXPECTED)"))
    # the LM head in bf16: log-probs and gradients against the same bf16 numbers computed in fp32
    g = torch.Generator(device).manual_seed(0)
    h = (torch.randn(256, ours16.config.hidden_size, device=device, generator=g) * 3).bfloat16().requires_grad_()
    w = ours16.lm_head.weight.detach().clone().requires_grad_()
    tokens = torch.randint(0, vocab, (256,), device=device, generator=g)
    lp, _ = M.head_logprobs(h, w, tokens, chunk=64)
    lp.sum().backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    lp32 = torch.log_softmax(h32 @ w32.T, -1).gather(-1, tokens[:, None]).squeeze(-1)
    lp32.sum().backward()
    head = {"logprob_err": (lp - lp32).abs().max().item(),
            "grad_weight_rel_err": ((w.grad.float() - w32.grad).norm() / w32.grad.norm()).item(),
            "grad_hidden_rel_err": ((h.grad.float() - h32.grad).norm() / h32.grad.norm()).item()}
    head["ok"] = head["logprob_err"] <= 1e-4 and max(head["grad_weight_rel_err"], head["grad_hidden_rel_err"]) <= 1e-2
    say(f"   bf16 LM head against fp32: max |log-prob error| {head['logprob_err']:.2e}, gradient relative error "
        f"weight {head['grad_weight_rel_err']:.2e}, hidden {head['grad_hidden_rel_err']:.2e} "
        f"({'OK' if head['ok'] else 'FAIL'}; weight gradient summed in place: "
        f"{device.type == 'cuda' and M._addmm_in_place_works(device)})")
    return {"shape": shape, "twins_fp32_max_err": twins, "ours_bf16_max_err": err_ours, "hf_bf16_max_err": err_hf,
            "ok": ok, "attention_kernels": kernels, "bf16_head": head}


def report_rollout(device, tiny, spec):
    """Rollout tokens/s against transformers' generate; the default decode step and the static one captured as a
    CUDA graph, each timed from the second token on (prefill, first token and the graph's capture excluded), against
    the bandwidth floor; and whether the two paths sample the same tokens."""
    shape, vocab, batch, prompt, new = ("tiny", 1000, 4, 16, 16) if tiny else ("3B", 151936, 64, 128, 512)
    hf, ours = twin_models(shape, vocab, torch.bfloat16, device)
    prompts = torch.randint(0, vocab, (batch, prompt), device=device)
    ids, no_eos = prompts.tolist(), vocab + 1

    def run_ours(n, graphs=False):
        return R.generate(ours, ids, n, temperature=1.0, eos_token_id=no_eos,
                          generator=torch.Generator(device).manual_seed(0), static=graphs, cuda_graph=graphs)

    def run_hf(n):
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_p=1.0,
                        top_k=0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def clock(fn, n, **kw):
        sync(device)
        t0 = time.perf_counter()
        fn(n, **kw)
        sync(device)
        return time.perf_counter() - t0
    run_ours(2), run_hf(2), run_ours(2, graphs=True)                          # warm-ups
    t_ours, t_hf = clock(run_ours, new), clock(run_hf, new)
    step = (t_ours - clock(run_ours, 1)) / (new - 1)
    # both graph runs capture (the capture happens before the first decode step): their difference is replays alone
    step_graphs = (clock(run_ours, new, graphs=True) - clock(run_ours, 1, graphs=True)) / (new - 1)
    cfg = ours.config
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2     # bf16 K and V
    weights = 2 * M.num_params(ours)
    # every step reads every weight and the cache: the default step the filled part (on average prompt + new/2
    # tokens), the static step the whole preallocated cache (prompt + new)
    read = {"default": weights + kv_per_token * batch * (prompt + new / 2),
            "static": weights + kv_per_token * batch * (prompt + new)}
    copy_bw = device_bandwidth(device, 1 << (26 if tiny else 30))      # --tiny: 64 MB, enough for a CPU's figure
    bw = {"measured copy": copy_bw, **({"data sheet": spec[2]} if spec else {})}
    floors = {k: {b: read[k] / v for b, v in bw.items()} for k in read}

    def of_floor(kind, t):
        return ", ".join(f"{floors[kind][b] / t:.0%} of the {b} floor" for b in bw)
    a, b = run_ours(new), run_ours(new, graphs=True)
    uniforms = R.draw_uniforms(new, batch, torch.Generator(device).manual_seed(0), device)   # the ones both drew
    divergence = graph_divergence(ours, ids, a, b, uniforms)
    say(f"2. rollout, {shape} shape, bf16, batch {batch}, prompt {prompt}, {new} new tokens, sampling: ours "
        f"{batch * new / t_ours:.0f} tok/s, transformers {batch * new / t_hf:.0f} tok/s ({t_hf / t_ours:.2f}x)")
    say(f"   decode step {step * 1e3:.2f} ms ({of_floor('default', step)}); CUDA graph"
        f"{'' if device.type == 'cuda' else ' (none on a CPU: the static step alone)'} {step_graphs * 1e3:.2f} ms "
        f"({of_floor('static', step_graphs)}); bandwidth: copy {copy_bw / 1e12:.2f} TB/s"
        + (f", data sheet {spec[2] / 1e12:.2f} TB/s" if spec else ""))
    say(f"   graph vs default, same seed: {divergence['rows_identical']}/{batch} rows identical, "
        f"{divergence['tokens_equal']}/{batch * new} tokens equal; before the first differing token max |log-prob "
        f"difference| {divergence['logprob_err']:.2e}; at it, probability mass the graph's distribution moved "
        f"{divergence['mass_moved']:.2e}")
    return {"shape": shape, "batch": batch, "prompt": prompt, "new": new, "ours_tok_s": batch * new / t_ours,
            "hf_tok_s": batch * new / t_hf, "speedup": t_hf / t_ours, "step_ms": step * 1e3,
            "graph_step_ms": step_graphs * 1e3, "copy_bandwidth": copy_bw, "floor_ms": {
                k: {b: v * 1e3 for b, v in f.items()} for k, f in floors.items()},
            **{f"graph_{k}": v for k, v in divergence.items()}}


# Two bf16 computations of the same step's distribution (eager decode, the static / graph step, a full forward) sum
# in different orders: their log-probs differ by up to ~1e-2, and so, in total variation, do their distributions.
BF16_LOGPROB_TOL = 0.05
BF16_MASS_TOL = 0.05


@torch.no_grad()
def graph_divergence(model, prompts, a, b, uniforms) -> dict:
    """What two decoding paths fed the same uniforms can be held to, on any machine. Bitwise equal tokens they
    cannot: their bf16 sums differ in order, and a draw that falls within that difference of a boundary of the
    inverse CDF picks the neighbouring token. What they must do: agree up to the first differing token of a row
    (log-probs within BF16_LOGPROB_TOL), and there differ only by a near tie. At the first differing token, the
    step's distribution p is recomputed by a full forward over the prompt and the common prefix: each path's
    log-prob of its own token must be p's (within BF16_LOGPROB_TOL), and `mass_moved`, the probability mass under p
    between the draw u and the other path's token's interval, is the least the two distributions must differ (in
    total variation) for the draw to pick differently: a near tie moves less than bf16's rounding (BF16_MASS_TOL)."""
    rows = tokens = 0
    lp_err = mass = 0.0
    for i, (r, q) in enumerate(zip(a.responses, b.responses)):
        rows += r == q
        tokens += sum(x == y for x, y in zip(r, q))
        n = next((t for t, (x, y) in enumerate(zip(r, q)) if x != y), None)
        same = min(len(r), len(q)) if n is None else n                          # the common prefix
        if same:
            lp_err = max(lp_err, (a.logprobs[i][:same] - b.logprobs[i][:same]).abs().max().item())
        if n is None:
            continue
        x = torch.tensor([prompts[i] + r[:n]], device=model.lm_head.weight.device)
        logp = torch.log_softmax(model(x, logits_from=-1)[0, -1].double(), -1)   # [V]: p at the differing step
        lp_err = max(lp_err, abs(a.logprobs[i][n].item() - logp[r[n]].item()),
                     abs(b.logprobs[i][n].item() - logp[q[n]].item()))
        cdf = logp.exp().cumsum(-1)
        u = uniforms[n, i, 0].item() * cdf[-1].item()
        lo, hi = (cdf[q[n] - 1].item() if q[n] else 0.0), cdf[q[n]].item()     # b's token's interval under p
        mass = max(mass, lo - u if u < lo else max(u - hi, 0.0))
    ok = lp_err <= BF16_LOGPROB_TOL and mass <= BF16_MASS_TOL
    return {"rows_identical": rows, "tokens_equal": tokens, "logprob_err": lp_err, "mass_moved": mass, "ok": ok}


def forward_flops(config, tokens: float, responses: float, head: str) -> float:
    """Model FLOPs of one sequence's forward over `tokens` positions: 2 per weight of every block's matmuls at every
    position, attention's 4 * layers * hidden per (query, key) pair of the causal triangle, and the head: the LM
    head's [V, H] only where log-probs are wanted (the `responses` positions), the value head's [1, H] everywhere.
    Embedding lookups are free."""
    L, H, I, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    block = 2 * H * H + 2 * H * kv + 3 * H * I                                # q, o; k, v; the MLP
    body = 2 * L * block * tokens + 4 * L * H * tokens * tokens / 2
    return body + (2 * V * H * responses if head == "lm" else 2 * H * tokens)


def report_ppo(device, tiny, spec):
    """Three PPO steps of the med-rlvr preset scaled down: seconds per phase, peak memory, model-FLOPs utilisation."""
    import data
    import demo
    import train
    shape, vocab = ("tiny", 1000) if tiny else ("0.5B", 151936)
    hf, _ = twin_models(shape, vocab, torch.float32, "cpu")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        qs = demo.make_questions(512, seed=1)
        tok = demo.train_tokenizer([data.build_prompt(q) + demo.solution(q, True) for q in qs])
        tok.save(f"{d}/tokenizer.json")
        batch = ["--rollout-batch", "8", "--train-batch", "4", "--micro-batch", "4", "--max-new-tokens", "16"] \
            if tiny else ["--rollout-batch", "64", "--train-batch", "32", "--micro-batch", "8", "--max-new-tokens",
                          "256"]
        train.main(["--preset", "med-rlvr", "--model", d, "--out", f"{d}/run", "--steps", "3", "--eval-limit", "8",
                    "--eval-batch", "8", "--save-every", "0", "--sample-every", "0", *batch])
        rows = [json.loads(line) for line in open(f"{d}/run/metrics.jsonl") if "reward" in line]
        args = train.parse_args(["--preset", "med-rlvr", *batch])
    prompt = statistics.mean(len(tok.encode(data.build_prompt(q)).ids) for q in demo.questions("train")[:256])
    last, config = rows[-1], M.Qwen2Config.from_dict(hf.config.to_dict())
    resp = last["response_length"]
    actor, critic = (forward_flops(config, prompt + resp, resp, head) for head in ("lm", "value"))
    # a step's model FLOPs (no recomputation counted): the rollout (one actor forward), the experience (actor,
    # reference and critic forwards), the update (forward + backward = 3 forwards, actor and critic, per epoch)
    flops = args.rollout_batch * (actor + 2 * actor + critic + 3 * (actor + critic) * args.ppo_epochs)
    mfu = flops / last["time_step"] / spec[1] if spec else None
    say(f"3. PPO step ({shape} shape, the preset scaled down), step 3: rollout {last['time_rollout']:.1f} s, "
        f"experience {last['time_experience']:.1f} s, update {last['time_train']:.1f} s, total "
        f"{last['time_step']:.1f} s; peak memory {last['peak_mem_mb'] / 1024:.1f} GB; "
        f"{flops / 1e12:.1f} TFLOP, MFU {f'{mfu:.1%}' if mfu is not None else 'n/a (no data sheet for this device)'}")
    return {"shape": shape, **{k: last[k] for k in train.TIMING_KEYS}, "tflop": flops / 1e12, "mfu": mfu,
            "peak_gb": max(r["peak_mem_mb"] for r in rows) * 2**20 / 1e9}


def report_training(device, tiny):
    """train.py end to end on a small random Qwen2 (made here, nothing downloaded): 2 steps straight, and 1 step
    with a checkpoint after it then --resume for the second; with and without --cuda-graphs; under torch's
    deterministic algorithms (CUDA's attention backward otherwise sums with atomics, in any order). Pass / fail:
    every metric and weight finite; the resumed run equal to the straight one (exactly, or else within 1e-4 in the
    weights and 1e-3 in the metrics); the graph run's step-1 tokens equal to the eager run's."""
    import gc
    import data
    import demo
    import train
    hf, _ = twin_models("tiny" if tiny else "small", 1000, torch.float32, "cpu")
    result, peak = {}, 0.0
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with tempfile.TemporaryDirectory() as d:
            qs = demo.make_questions(512, seed=1)
            tok = demo.train_tokenizer([data.build_prompt(q) + demo.solution(q, True) for q in qs])
            hf.save_pretrained(f"{d}/base")
            tok.save(f"{d}/base/tokenizer.json")
            batch = 4 if tiny else 8                                        # responses a step
            flags = ["--model", f"{d}/base", "--rollout-batch", str(batch), "--train-batch", str(batch // 2),
                     "--micro-batch", str(batch // 2), "--max-new-tokens", "8" if tiny else "16", "--eval-limit",
                     "2" if tiny else "8", "--save-every", "1", "--sample-every", "1", "--actor-lr", "1e-3",
                     "--critic-lr", "1e-3"]
            for graphs in ("off", "on"):                  # the eager decode step, then the CUDA graph (the default)
                run = [*flags, "--cuda-graphs", graphs]
                for extra in (["--out", f"{d}/straight-{graphs}", "--steps", "2"],
                              ["--out", f"{d}/resumed-{graphs}", "--steps", "1"],
                              ["--out", f"{d}/resumed-{graphs}", "--steps", "2", "--resume"]):
                    train.main([*run, *extra])
                    gc.collect()                                        # the run's models, before the next
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows = {k: [json.loads(line) for line in open(f"{d}/{k}-{graphs}/metrics.jsonl")]
                        for k in ("straight", "resumed")}
                peak = max([peak] + [r["peak_mem_mb"] for r in rows["straight"] + rows["resumed"]
                                     if "peak_mem_mb" in r])
                finite = all(v is not None for r in rows["straight"] + rows["resumed"] for v in r.values())
                w = {k: M.read_safetensors(f"{d}/{k}-{graphs}/final", "cpu") for k in ("straight", "resumed")}
                finite &= common.non_finite({n: t for n, (t, _) in w["straight"].items()}) is None
                weight_diff = max((w["straight"][n][0] - w["resumed"][n][0]).abs().max().item() for n in w["straight"])
                metric_diff = max(abs(a[k] - b[k]) for a, b in zip(rows["straight"], rows["resumed"]) for k in a
                                  if k not in train.TIMING_KEYS and isinstance(a[k], float) and b.get(k) is not None)
                exact = weight_diff == 0.0 and metric_diff == 0.0
                close = len(rows["straight"]) == len(rows["resumed"]) and weight_diff <= 1e-4 and metric_diff <= 1e-3
                result[f"--cuda-graphs {graphs}"] = {"finite": finite, "resume_exact": exact, "resume_close": close,
                                               "resume_weight_diff": weight_diff, "resume_metric_diff": metric_diff}
                how = "exactly" if exact else f"weights differ by {weight_diff:.1e}, metrics by {metric_diff:.1e}"
                say(f"4. training smoke run, --cuda-graphs {graphs}: metrics and weights finite "
                    f"{'PASS' if finite else 'FAIL'}; resume equal to the uninterrupted run "
                    f"{'PASS' if close else 'FAIL'} ({how})")
            samples = {g: [json.loads(line)["response"] for line in open(f"{d}/straight-{g}/samples.jsonl")]
                       for g in ("off", "on")}
            same = [a == b for a, b in zip(*samples.values())]
            equal, first = sum(same), same[:batch]                          # step 1: the same weights on both sides
            result["graph_responses_equal"], result["graph_step1_equal"] = f"{equal}/{len(same)}", all(first)
            say(f"   graph tokens equal to the eager step's: step 1 {'PASS' if all(first) else 'FAIL'} "
                f"({sum(first)}/{len(first)} responses); both steps {equal}/{len(same)} responses")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    result["peak_gb"] = peak * 2**20 / 1e9
    return result


class TimeBoxExceeded(BaseException):
    """A section ran past SECTION_SECONDS (a BaseException: the code it interrupts may catch Exception). The alarm
    is seen between Python bytecodes, so a section stuck inside one CUDA call ends when that call does."""


def write_report(report: dict, out: Path):
    """The report as it stands, replacing the file whole (a run cut short keeps the last complete one)."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)


def gpu_report(args):
    """The four sections, each time-boxed; every number also goes to one JSON file (--report), rewritten after
    each section, so a run cut short still leaves what it measured. A section that fails is reported and skipped."""
    import signal
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if device.type == "cuda":                  # before cuBLAS starts: its deterministic mode (section 4) needs it
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    common.init_distributed()                  # on CUDA one process group for every train.py run below
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    spec = next(((k, f, b) for k, f, b in GPU_SPECS if k in name), None) if device.type == "cuda" else None
    report = {"machine": {"device": name, "data_sheet": spec and {"match": spec[0], "bf16_flops": spec[1],
                                                                   "bandwidth": spec[2]},
                          "torch": torch.__version__, "tiny": args.tiny}}
    say(f"GPU report on {name}, torch {torch.__version__}{' (tiny shapes)' if args.tiny else ''}"
        + (f"; data sheet: {spec[1] / 1e12:.0f} TFLOP/s bf16, {spec[2] / 1e12:.2f} TB/s" if spec else ""))
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)

    def on_alarm(sig, frame):
        raise TimeBoxExceeded("over its time box")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    sections = {"parity": lambda: report_parity(device, args.tiny),
                "rollout": lambda: report_rollout(device, args.tiny, spec),
                "ppo": lambda: report_ppo(device, args.tiny, spec),
                "training": lambda: report_training(device, args.tiny)}
    try:
        for key, section in sections.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)             # each section's own peak
            t0 = time.perf_counter()
            signal.alarm(SECTION_SECONDS[key])
            try:
                report[key] = section()
            except (Exception, TimeBoxExceeded) as e:                  # report it, go on with the next section
                report[key] = {"error": f"{type(e).__name__}: {e}"}
                say(f"   {key}: FAILED: {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            report[key]["seconds"] = time.perf_counter() - t0
            if device.type == "cuda" and "peak_gb" not in report[key]:    # (train.py runs report their own)
                report[key]["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            write_report(report, out)
    finally:
        signal.signal(signal.SIGALRM, previous)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    report["verdict"] = verdict(report)
    write_report(report, out)
    say(f"report: {out}")
    return report


def checks(key: str, r: dict) -> list[tuple[bool, str]]:
    """A section's pass / fail checks: (passed, the figure that decided it and its limit)."""
    if "error" in r:                                                   # a section that raised fails
        return [(False, r["error"])]
    if key == "parity":
        return [(r["ok"], f"bf16 logit error ours {r['ours_bf16_max_err']:.4f} <= 1.5 x transformers' "
                          f"{r['hf_bf16_max_err']:.4f} + 1e-3"),
                (r["bf16_head"]["ok"], f"bf16 LM head log-prob error {r['bf16_head']['logprob_err']:.1e} <= 1e-4, "
                                       "gradients within 1e-2")]
    if key == "rollout":
        return [(r["graph_logprob_err"] <= BF16_LOGPROB_TOL, "graph vs default: log-probs up to the first differing "
                 f"token within {r['graph_logprob_err']:.1e} <= {BF16_LOGPROB_TOL}"),
                (r["graph_mass_moved"] <= BF16_MASS_TOL,
                 f"at it, mass moved {r['graph_mass_moved']:.1e} <= {BF16_MASS_TOL} (a near tie)")]
    if key == "ppo":
        return [(True, f"{r['time_step']:.1f} s a step")]
    return [(r[run]["finite"] and r[run]["resume_close"],
             f"{run}: finite, resume " + ("exact" if r[run]["resume_exact"] else
                                          f"within 1e-4 / 1e-3: weights {r[run]['resume_weight_diff']:.1e}, metrics "
                                          f"{r[run]['resume_metric_diff']:.1e}")) for run in ("--cuda-graphs off", "--cuda-graphs on")]


def verdict(report) -> dict:
    """One line per section, PASS or FAIL, with the figures that decided it; -> {section: passed}."""
    result = {}
    for key in ("parity", "rollout", "ppo", "training"):
        found = checks(key, report[key])
        result[key] = all(passed for passed, _ in found)
        say(f"{'PASS' if result[key] else 'FAIL'} {key}: " + "; ".join(text for _, text in found))
    return result
