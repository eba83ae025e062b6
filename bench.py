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

--device cuda: the GPU report (gpu_report.py): parity, rollout speed, a PPO step's phases and a training smoke
run, each with a PASS / FAIL line; --device cpu --tiny runs it in miniature.
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
import gpu_report
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
    parser.add_argument("--report", default="runs/gpu-report.json",
                        help="--device: every number of the report, one key per section, rewritten after each")
    parser.add_argument("--flops", action="store_true", help="print this machine's fp32 matmul GFLOP/s (the yardstick "
                                                             "the README quotes times with) and exit")
    return parser


def fp32_gflops(n: int = 1024, rounds: int = 20) -> float:
    """This machine's fp32 matmul speed, all of torch's threads: best of `rounds` n x n products, in GFLOP/s. Times
    quoted with it can be compared across machines whose speed varies 2-3x."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(rounds))
    return 2 * n**3 / best / 1e9


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


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.flops:
        gflops = fp32_gflops()
        print(f"fp32 matmul: {gflops:.0f} GFLOP/s on {torch.get_num_threads()} threads")
        return gflops
    if args.device:
        report = gpu_report.gpu_report(args)
        failed = [k for k, ok in report["verdict"].items() if not ok]
        if failed:
            raise common.Abort(f"bench: {len(failed)} of {len(report['verdict'])} sections failed: "
                               f"{', '.join(failed)} (see {args.report})")
        return report
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
    floor_s = n_params * 4 / gpu_report.device_bandwidth(torch.device("cpu"), 1 << 29)
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
