"""
Rollout speed: our rollout.generate against transformers' generate, on the same random-weight model.

    python bench.py                      # Qwen2.5-0.5B's shape, fp32, batch 8, 64-token prompts, 64 new tokens
    python bench.py --layers 4 --new 16  # a quicker look
    python bench.py --memory             # peak memory of one PPO update's LM head: full logits vs chunked
    python bench.py --device cuda        # the GPU report (below); --device cpu --tiny runs it in miniature

Both sides sample (temperature 1, top-p 1) from the same weights; neither may stop early (no EOS can match),
so both produce exactly batch * new tokens. The two are timed alternately, several rounds, and the median is
reported. Besides tokens/s and their ratio, it prints how near our decode step is to the memory-bandwidth
floor: every decode step must read every weight once, so a step can take no less than
(weight bytes) / (copy bandwidth measured here).

--memory: one PPO policy-loss forward and backward with Qwen2.5's vocabulary (151,936) over 8 x 512 response
tokens, on a 2-block body of the 0.5B shape, once through the full [8, 512, V] logits (ppo.logprobs_from_logits,
as before) and once through model.head_logprobs (chunks of positions, recomputed in backward). Each runs in its
own process; the peak resident memory above the process's memory before the update is reported.

--device cuda: the GPU report, needing nothing outside the repository (random weights, the demo's tokenizer):
  1. bf16 logits of the Qwen2.5-0.5B shape against transformers' (both measured against transformers in fp32);
  2. rollout tokens/s against transformers' generate on the Qwen2.5-3B shape (batch 64, 128-token prompts, 512
     new tokens, sampling), and the decode step's share of the HBM floor (weights + KV cache read once a step);
  3. three PPO steps of the med-rlvr preset scaled down (0.5B shape, rollout batch 64, 256 new tokens): seconds
     per phase, peak memory, and the step's model-FLOPs utilisation.
Rollouts are timed with the default decode step and with the static step captured as a CUDA graph (train.py
--cuda-graphs, off by default until this report shows it equal and faster).
"""
import argparse
import json
import statistics
import subprocess
import sys
import os
import tempfile
import time

import torch

import common
import model as M
import ppo
import rollout as R


def make_parser():
    parser = common.parser(__doc__)
    parser.add_argument("--hidden", type=common.positive_int, default=896, help="hidden size (Qwen2.5-0.5B: 896)")
    parser.add_argument("--layers", type=common.positive_int, default=24, help="decoder blocks")
    parser.add_argument("--heads", type=common.positive_int, default=14, help="query heads")
    parser.add_argument("--kv-heads", type=common.positive_int, default=2, help="key/value heads")
    parser.add_argument("--intermediate", type=common.positive_int, default=4864, help="MLP width")
    parser.add_argument("--vocab", type=common.positive_int, default=151936, help="vocabulary size")
    parser.add_argument("--batch", type=common.positive_int, default=8, help="prompts decoded together")
    parser.add_argument("--prompt", type=common.positive_int, default=64, help="prompt length in tokens")
    parser.add_argument("--new", type=common.positive_int, default=64, help="new tokens per prompt (at least 2)")
    parser.add_argument("--rounds", type=common.positive_int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--memory", action="store_true", help="measure the PPO update's LM-head memory instead")
    parser.add_argument("--responses", type=common.positive_int, default=8, help="--memory: responses per update")
    parser.add_argument("--response-len", type=common.positive_int, default=512, help="--memory: tokens each")
    parser.add_argument("--memory-child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="the GPU report (see the docstring) on this device")
    parser.add_argument("--tiny", action="store_true", help="--device: tiny shapes and batches (a quick check)")
    return parser


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)


def update_peak_mb(args, mode):
    """In a fresh process: one policy-loss forward + backward; -> peak RSS above the RSS before it, in MB."""
    import resource
    torch.manual_seed(0)
    cfg = M.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=2, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                        tie_word_embeddings=True)
    net = M.init_model(cfg).train()
    P, R = 64, args.response_len
    ids = torch.randint(0, args.vocab, (args.responses, P + R))
    mask, adv = torch.ones(args.responses, R), torch.randn(args.responses, R)
    before = rss_mb()
    if mode == "full":                      # the [B, R, V] logits, kept for backward and for the entropy
        logits = net(ids[:, :-1], logits_from=P - 1)
        logprobs = ppo.logprobs_from_logits(logits, ids[:, P:])
        with torch.no_grad():
            ppo.entropy_from_logits(logits)
    else:
        logprobs, _ = net(ids[:, :-1], logits_from=P - 1, logprobs_of=ids[:, P:])
    ppo.policy_loss(logprobs, logprobs.detach(), adv, mask)[0].backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def memory(args):
    peaks = {}
    for mode in ("full", "chunked"):
        r = subprocess.run([sys.executable, __file__, "--memory-child", mode, *sys.argv[1:]], capture_output=True,
                           text=True, check=True)
        peaks[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
    print(f"one PPO update, {args.responses} x {args.response_len} response tokens, vocabulary {args.vocab}, "
          f"fp32, CPU: peak memory above the model")
    print(f"full logits  {peaks['full']:8.0f} MB")
    print(f"chunked head {peaks['chunked']:8.0f} MB   ({peaks['full'] / peaks['chunked']:.1f}x less)")


# ------------------------------------------------------------------------------------------------ the GPU report
SHAPES = {"0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
          "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}     # dense, per GPU


def twin_models(shape, vocab, dtype, device):
    """transformers' Qwen2 with random weights, and ours sharing the very same tensors (the module names are the
    checkpoint's, so one strict load_state_dict with assign=True)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPES[shape])).to(dtype)
    with torch.device("meta"):
        ours = M.Qwen2ForCausalLM(M.Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPES[shape]))
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


def report_parity(device, tiny):
    shape, vocab = ("tiny", 1000) if tiny else ("0.5B", 151936)
    hf32, _ = twin_models(shape, vocab, torch.float32, device)
    hf16, ours16 = twin_models(shape, vocab, torch.bfloat16, device)
    x = torch.randint(0, vocab, (4, 128), device=device)
    with torch.no_grad():
        ref = hf32(x).logits.float()
        err_hf = (hf16(x).logits.float() - ref).abs().max().item()
        err_ours = (ours16(x).float() - ref).abs().max().item()
    print(f"1. bf16 logits, {shape} shape, 4 x 128 tokens, max |error| against transformers fp32: ours {err_ours:.4f}, "
          f"transformers bf16 {err_hf:.4f} ({'OK' if err_ours <= 1.5 * err_hf + 1e-3 else 'LARGER'})")


def report_rollout(device, tiny):
    shape, vocab, batch, prompt, new = ("tiny", 1000, 4, 16, 16) if tiny else ("3B", 151936, 64, 128, 512)
    hf, ours = twin_models(shape, vocab, torch.bfloat16, device)
    prompts = torch.randint(0, vocab, (batch, prompt), device=device)
    ids, no_eos = prompts.tolist(), vocab + 1

    def run_ours(n, graphs=False):
        R.generate(ours, ids, n, temperature=1.0, eos_token_id=no_eos,
                   generator=torch.Generator(device).manual_seed(0), static=graphs, cuda_graph=graphs)

    def run_graphs(n):
        run_ours(n, graphs=True)

    def run_hf(n):
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_p=1.0,
                        top_k=0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def clock(fn, n):
        sync(device)
        t0 = time.perf_counter()
        fn(n)
        sync(device)
        return time.perf_counter() - t0
    run_ours(2), run_hf(2), run_graphs(2)
    t_ours, t_hf, t_pre = clock(run_ours, new), clock(run_hf, new), clock(run_ours, 1)
    t_graphs = clock(run_graphs, new)
    step, step_graphs = (t_ours - t_pre) / (new - 1), (t_graphs - t_pre) / (new - 1)
    cfg = ours.config
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2     # bf16 K and V
    floor = (2 * M.num_params(ours) + kv_per_token * batch * (prompt + new / 2)) / device_bandwidth(device)
    print(f"2. rollout, {shape} shape, bf16, batch {batch}, prompt {prompt}, {new} new tokens, sampling: ours "
          f"{batch * new / t_ours:.0f} tok/s, transformers {batch * new / t_hf:.0f} tok/s ({t_hf / t_ours:.2f}x); "
          f"decode step {step * 1e3:.1f} ms, HBM floor {floor * 1e3:.2f} ms ({floor / step:.0%}); with CUDA graphs "
          f"(static step{'' if device.type == 'cuda' else ', no graph on a CPU'}) {batch * new / t_graphs:.0f} tok/s, "
          f"step {step_graphs * 1e3:.1f} ms ({floor / step_graphs:.0%} of the floor)")


def report_ppo(device, tiny):
    import data
    import train
    shape, vocab = ("tiny", 1000) if tiny else ("0.5B", 151936)
    hf, _ = twin_models(shape, vocab, torch.float32, "cpu")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        qs = data.make_dose_questions(512, seed=1)
        data.train_demo_tokenizer([data.build_prompt(q) + data.dose_solution(q, True) for q in qs]).save(
            f"{d}/tokenizer.json")
        batch = ["--rollout-batch", "8", "--train-batch", "4", "--micro-batch", "4", "--max-new-tokens", "16"] \
            if tiny else ["--rollout-batch", "64", "--train-batch", "32", "--micro-batch", "8", "--max-new-tokens",
                          "256"]
        train.main(["--preset", "med-rlvr", "--model", d, "--out", f"{d}/run", "--steps", "3", "--eval-limit", "8",
                    "--eval-batch", "8", "--save-every", "0", "--sample-every", "0", *batch])
        rows = [json.loads(line) for line in open(f"{d}/run/metrics.jsonl") if "reward" in line]
    n, last = M.num_params(hf), rows[-1]
    tokens = (8 if tiny else 64) * (40 + last["response_length"])          # sequences x (~40 prompt tokens + response)
    # model FLOPs of a step, 2 a parameter a token forward, 6 forward + backward: the rollout (~1 forward), the
    # experience (actor, reference, critic forwards), the update (actor and critic, one PPO epoch)
    flops = (2 + 3 * 2 + 2 * 6) * n * tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = f"{flops / last['time_step'] / peak:.1%}" if peak else "n/a"
    print(f"3. PPO step ({shape} shape, the preset scaled down), step 3: rollout {last['time_rollout']:.1f} s, "
          f"experience {last['time_experience']:.1f} s, update {last['time_train']:.1f} s, total "
          f"{last['time_step']:.1f} s; peak memory {last['peak_mem_mb'] / 1024:.1f} GB; MFU ~{mfu}")


def gpu_report(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU report on {name}, torch {torch.__version__}{' (tiny shapes)' if args.tiny else ''}")
    report_parity(device, args.tiny)
    report_rollout(device, args.tiny)
    report_ppo(device, args.tiny)


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.device:
        return gpu_report(args)
    if args.memory_child:
        print(json.dumps({"peak_mb": update_peak_mb(args, args.memory_child)}))
        return
    if args.memory:
        return memory(args)
    if args.new < 2:
        raise ValueError(f"--new {args.new}: the decode step is timed from the second new token on, give >= 2")
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      intermediate_size=args.intermediate, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        Qwen2ForCausalLM(cfg).save_pretrained(d)
        hf = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ours = M.load_model(d, dtype=torch.float32, device="cpu")
    n_params = M.num_params(ours)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt))
    ids = prompts.tolist()
    no_eos = args.vocab + 1                                   # an id no model can emit: nobody stops early

    def run_ours(new):
        R.generate(ours, ids, new, temperature=1.0, eos_token_id=no_eos, generator=torch.Generator().manual_seed(0))

    def run_hf(new):
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                        top_p=1.0, top_k=0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                        pad_token_id=0)

    run_ours(2), run_hf(2)                                    # warm-up
    t_ours, t_hf, t_prefill, t_hf_prefill = [], [], [], []
    for _ in range(args.rounds):
        t_ours.append(timed(lambda: run_ours(args.new)))
        t_hf.append(timed(lambda: run_hf(args.new)))
        t_prefill.append(timed(lambda: run_ours(1)))
        t_hf_prefill.append(timed(lambda: run_hf(1)))
    ours_s, hf_s, prefill_s, hf_prefill_s = map(statistics.median, (t_ours, t_hf, t_prefill, t_hf_prefill))
    tokens = args.batch * args.new
    step_s = (ours_s - prefill_s) / (args.new - 1)            # one decode step, prefill (and first token) excluded
    hf_step_s = (hf_s - hf_prefill_s) / (args.new - 1)
    floor_s = n_params * 4 / device_bandwidth(torch.device("cpu"), 1 << 29)
    print(f"model: {n_params / 1e6:.0f}M params, fp32, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"prompt {args.prompt}, new {args.new}, sampling")
    print(f"ours         {tokens / ours_s:8.1f} tok/s  ({ours_s:.2f} s; prefill {prefill_s:.2f} s, "
          f"decode step {step_s * 1e3:.0f} ms)")
    print(f"transformers {tokens / hf_s:8.1f} tok/s  ({hf_s:.2f} s; prefill {hf_prefill_s:.2f} s, "
          f"decode step {hf_step_s * 1e3:.0f} ms)")
    print(f"ratio        {hf_s / ours_s:8.2f}x  (decode steps alone {hf_step_s / step_s:.2f}x)")
    print(f"bandwidth floor per decode step {floor_s * 1e3:.0f} ms -> ours at {floor_s / step_s:.0%} of the floor")


if __name__ == "__main__":
    common.cli(main)
