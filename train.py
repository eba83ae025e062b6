"""
Med-RLVR: PPO with a verifiable reward on a base language model.

    torchrun --standalone --nproc_per_node=2 train.py     # the CPU demo: no flags, nothing downloaded, runs/demo/
    python train.py                                       # the same demo in one process

    # the paper's recipe (Qwen2.5-3B base, MedQA), on one 8-GPU node:
    torchrun --standalone --nproc_per_node=8 train.py --preset med-rlvr --model Qwen2.5-3B \\
        --train-data medqa/train.jsonl --eval-data medqa/test.jsonl --out runs/med-rlvr

One PPO step, as OpenRLHF 0.5.9 (which Med-RLVR used) does it:
  1. rollout     each rank samples one response for its share of `rollout_batch` prompts (rollout.generate);
  2. reward      reward.score on "<think>" + response: +1 right, `incorrect_reward` wrong, -1 broken format;
  3. experience  the frozen reference gives ref log-probs, the critic gives values; the per-token reward is
                 -beta * KL(k1) on every response token plus the score on the last one (ppo.token_rewards);
                 GAE(gamma, lambda) gives advantages, whitened over the whole rollout batch, and returns;
  4. learn       `ppo_epochs` passes over minibatches of `train_batch`: the clipped policy loss steps the actor,
                 the clipped value loss steps the critic (AdamW, grad-norm clipping, linear warmup).
The old log-probs come from the actor's training forward over the finished sequences (as OpenRLHF), at the
rollout's temperature, so the ratio starts at exactly 1; in fp32 they equal the sampler's own (tested), and the
gap between the two is logged as `sampler_logprob_err` (bf16 decoding drifts a little).
On GPUs actor and critic keep fp32 weights and AdamW state and compute in bf16 (sft.shard explains why).

Deliberate simplifications: one response per prompt (OpenRLHF's PPO default); a fixed KL coefficient; no
reward or value normalisation. A truncated response (no EOS within max_new_tokens) is scored like any other
(it rarely closes </answer>, so it usually gets -1 for its format), its last token ends the episode (GAE does
not bootstrap past it), and the share of them is logged as `truncated`.

Distributed: actor, critic and reference are each sharded with FSDP2 per decoder block (sft.shard). Rollouts
must not all-gather every block for every decoded token, and the ranks stop decoding at different times; so
before sampling every FSDP unit gathers its full weights once and keeps them (full_weights), and frees them after.
"""
import argparse
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import evaluate
import model as M
import ppo
import reward
import rollout
import sft

# ------------------------------------------------------------------------------------------------ flags
# The defaults are the CPU demo: a tiny model (built by sft.build_demo_base), synthetic dose questions.
DEFAULTS = dict(
    model=None,             # base checkpoint folder (HF layout); None: the demo's tiny base model
    train_data=None,        # MedQA train jsonl; None: the demo's synthetic dose questions
    eval_data=None,         # held-out set for eval_accuracy (MedQA test jsonl); None: fresh dose questions
    out="runs/demo",
    steps=60,               # PPO steps; 0 = one pass over the train data
    rollout_batch=64,       # prompts sampled per step, over all ranks (one response each)
    train_batch=32,         # sequences per optimizer step, over all ranks
    micro_batch=32,         # sequences per forward/backward on one rank (memory, not maths)
    ppo_epochs=2,
    actor_lr=5e-4, critic_lr=1e-3, warmup=3, weight_decay=0.0, grad_clip=1.0,
    kl_coef=0.01, kl_estimator="k1", gamma=1.0, lam=1.0, clip=0.2, value_clip=0.2,
    loss_agg="token",       # "token": token-mean over the minibatch; "seq": mean per response, then over responses
    temperature=1.0, top_p=1.0, max_prompt_len=1024, max_new_tokens=40,
    incorrect_reward=0.0,   # -1.0 is the paper's ablation
    eval_limit=256, eval_batch=64,
    save_every=10, sample_every=5, seed=0, resume=False,
    grad_checkpoint=False,  # recompute each block's activations in backward (long sequences on GPUs)
)
PRESETS = {
    # Med-RLVR (arXiv 2502.19655) as far as it is published: OpenRLHF 0.5.9 on Qwen2.5-3B base, with the
    # hyper-parameters of this reproduction's brief (lambda 1; OpenRLHF's CLI default is 0.95: --lam 0.95).
    # Deliberate deviations from OpenRLHF: constant lr after warmup (it decays by cosine to 0.1 lr), token-mean
    # loss (0.5.x averages per sequence: --loss-agg seq), old log-probs and all else as documented above.
    "med-rlvr": dict(steps=0, rollout_batch=512, train_batch=128, micro_batch=4, ppo_epochs=1,
                     actor_lr=1e-6, critic_lr=9e-6, warmup=5, kl_coef=0.01, kl_estimator="k1", gamma=1.0,
                     lam=1.0, clip=0.2, value_clip=0.2, temperature=1.0, max_prompt_len=1024,
                     max_new_tokens=1024, eval_limit=0, eval_batch=128, save_every=5, sample_every=1,
                     grad_checkpoint=True),
}
TIMING_KEYS = ("time_rollout", "time_experience", "time_train", "time_step", "tokens_per_s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="PPO with verifiable rewards (Med-RLVR)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
        else:
            parser.add_argument(flag, type=type(v) if v is not None else str, default=v)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])        # flags given explicitly still win
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers
@contextmanager
def full_weights(model):
    """Gather every FSDP unit's full weights once (in the compute dtype: bf16 on CUDA) and keep them until the
    block ends (no communication while decoding, so ranks may decode different numbers of tokens); free them
    after. A plain module needs nothing."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    blocks = [u for u in units if u is not model]               # the root is never resharded after forward
    for u in units:
        u.unshard()
    for u in blocks:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
        for u in blocks:
            u.set_reshard_after_forward(True, recurse=False)


def pack(prompts, responses, device):
    """Left-padded prompts + right-padded responses, so every response starts at column P.

    -> input_ids [B, P+R], attention_mask [B, P+R], response mask [B, R], P. Masks come from lengths, never from
    token ids (Qwen's EOS is also its pad)."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    input_ids = torch.zeros(len(prompts), P + R, dtype=torch.long)
    attn = torch.zeros(len(prompts), P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P + len(r)] = torch.tensor(p + r)
        attn[i, P - len(p):P + len(r)] = 1
    return input_ids.to(device), attn.to(device), attn[:, P:].float().to(device), P


def response_logits(policy, input_ids, attn, P):
    """Logits [B, R, V] that predict the response tokens: position P-1+j predicts the token at column P+j."""
    return policy(input_ids[:, :-1], attention_mask=attn[:, :-1], logits_from=P - 1)


def response_values(critic, input_ids, attn, P):
    """Values [B, R]: V(state before response token j), read at the same positions as response_logits."""
    return critic(input_ids[:, :-1], attention_mask=attn[:, :-1])[:, P - 1:]


def whiten(x, mask, world):
    """ppo.masked_whiten over the whole rollout batch, all ranks together."""
    if world == 1:
        return ppo.masked_whiten(x, mask)
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    return ((x - mean) * torch.rsqrt(var + 1e-8) * mask).float()


def score_texts(tok, responses, examples, incorrect_reward):
    texts = [data.PROMPT_PREFILL + data.decode(tok, r) for r in responses]
    return texts, [reward.score(t, ex.answer, incorrect_reward) for t, ex in zip(texts, examples)]


@torch.no_grad()
def eval_accuracy(policy, tok, examples, prompts, args, rank, world):
    """Greedy accuracy and valid-format rate on held-out examples (each rank decodes its share)."""
    n_right = n_valid = 0
    mine = list(range(rank, len(examples), world))
    with full_weights(policy):
        for k in range(0, len(mine), args.eval_batch):
            idx = mine[k:k + args.eval_batch]
            out = rollout.generate(policy, [prompts[i] for i in idx], args.max_new_tokens, temperature=0,
                                   eos_token_id=data.eos_token_id(tok))
            _, scores = score_texts(tok, out.responses, [examples[i] for i in idx], 0.0)
            n_right += sum(s == 1.0 for s in scores)
            n_valid += sum(s > -1.0 for s in scores)
    return sft.all_sum(n_right, world) / len(examples), sft.all_sum(n_valid, world) / len(examples)


# ------------------------------------------------------------------------------------------------ one PPO step
def make_experience(actor, critic, ref, tok, examples, prompts, step, args, rank, world, device):
    """Rollout + reward + reference / critic forwards + GAE, for this rank's share of the step's prompts."""
    t0 = time.time()
    gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    with full_weights(actor):
        out = rollout.generate(actor, prompts, args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, eos_token_id=data.eos_token_id(tok), generator=gen)
    t_rollout = time.time() - t0
    texts, scores = score_texts(tok, out.responses, examples, args.incorrect_reward)

    input_ids, attn, mask, P = pack(prompts, out.responses, device)                # mask: [B, R]
    sampler_logprobs = torch.zeros_like(mask)                                      # [B, R]
    for i, lp in enumerate(out.logprobs):
        sampler_logprobs[i, :len(lp)] = lp.to(device)
    # The old log-probs are recomputed by the same forward that training uses (as OpenRLHF does), so the PPO
    # ratio is exactly 1 on the first minibatch and the KL exactly 0 while actor == reference. In fp32 they equal
    # the sampler's (tested); in bf16 the cached decode drifts a little: logged as sampler_logprob_err.
    old_logprobs, ref_logprobs, values = (torch.zeros_like(mask) for _ in range(3))
    with torch.no_grad():
        for a in range(0, len(prompts), args.micro_batch):
            s = slice(a, a + args.micro_batch)
            for net, dest in ((actor, old_logprobs), (ref, ref_logprobs)):
                logits = response_logits(net, input_ids[s], attn[s], P)
                dest[s] = ppo.logprobs_from_logits(logits, input_ids[s, P:], args.temperature)
            values[s] = response_values(critic, input_ids[s], attn[s], P)
    kl = ppo.kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask     # [B, R]
    # The KL goes here, into the reward of every token (not into the loss): the critic learns it, GAE spreads it.
    rewards = ppo.token_rewards(torch.tensor(scores, device=device), kl, mask, args.kl_coef)
    advantages, returns = ppo.compute_gae(rewards, values, mask, args.gamma, args.lam)
    advantages = whiten(advantages, mask, world)
    exp = dict(input_ids=input_ids, attn=attn, mask=mask, P=P, old_logprobs=old_logprobs, values=values,
               advantages=advantages, returns=returns)
    n = len(prompts)
    stats = dict(reward=sum(scores), accuracy=sum(s == 1.0 for s in scores), format=sum(s > -1.0 for s in scores),
                 response_length=float(mask.sum()), truncated=sum(not f for f in out.finished),
                 kl=float(ppo.masked_mean(kl, mask, dim=-1).sum()), n=n,
                 sampler_logprob_err=float(ppo.masked_mean((sampler_logprobs - old_logprobs).abs(), mask, dim=-1).sum()),
                 # the paper's "direct answer hacker" stage: the answer shows up early in the think block
                 direct_answer=sum(evaluate.classify(t, ex.options) == evaluate.DIRECT_ANSWER
                                   for t, ex in zip(texts, examples)))
    return exp, stats, texts, scores, t_rollout, time.time() - t0 - t_rollout


def ppo_update(actor, critic, actor_opt, critic_opt, exp, idx, args, world):
    """One optimizer step of actor and critic on the rows `idx` of this rank's experience.

    The loss is averaged over the whole minibatch of all ranks ("token": every response token weighs the same;
    "seq": every response does): each micro-batch's mean is weighted by its share of the global count, and the
    world size undoes FSDP's gradient averaging. Returns summed metrics (divide by the global count)."""
    mask = exp["mask"]
    count = (lambda m: float(m.sum())) if args.loss_agg == "token" else (lambda m: float(len(m)))
    n_global = sft.all_sum(count(mask[idx]), world)
    seq_mean = args.loss_agg == "seq"
    m = dict(policy_loss=0.0, value_loss=0.0, clip_frac=0.0, entropy=0.0, approx_kl=0.0)
    for a in range(0, len(idx), args.micro_batch):
        s = idx[a:a + args.micro_batch]
        ids, attn, mk, P = exp["input_ids"][s], exp["attn"][s], mask[s], exp["P"]
        weight = count(mk) / n_global
        logits = response_logits(actor, ids, attn, P)                              # [b, R, V]
        logprobs = ppo.logprobs_from_logits(logits, ids[:, P:], args.temperature)  # same temperature as rollout
        pl, clip_frac, approx_kl = ppo.policy_loss(logprobs, exp["old_logprobs"][s], exp["advantages"][s], mk,
                                                   args.clip, seq_mean)
        (pl * weight * world).backward()
        values = response_values(critic, ids, attn, P)
        vl = ppo.value_loss(values, exp["values"][s], exp["returns"][s], mk, args.value_clip, seq_mean)
        (vl * weight * world).backward()
        with torch.no_grad():
            entropy = ppo.masked_mean(ppo.entropy_from_logits(logits), mk)
        for k, v in zip(m, (pl, vl, clip_frac, entropy, approx_kl)):
            m[k] += float(v.detach()) * weight
    for net, opt in ((actor, actor_opt), (critic, critic_opt)):
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return m


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(out: Path, actor, critic, actor_opt, critic_opt, step, args, rank, world, tok):
    """<out>/checkpoint: actor/ and critic/ (safetensors), optim.pt, rng_rank*.pt, state.json (the step; the data
    position and every sampler seed derive from it). Written to checkpoint.tmp, then swapped in by a rename."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    actor_sd, critic_sd = sft.full_state_dict(actor, world), sft.full_state_dict(critic, world)
    optim = {"actor": get_optimizer_state_dict(actor, actor_opt, options=opts),
             "critic": get_optimizer_state_dict(critic, critic_opt, options=opts)}
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0)},
               tmp / f"rng_rank{rank}.pt")
    if world > 1:
        dist.barrier()                                           # every rank's file is in before the rename
    if rank == 0:
        M.save_model(actor, tmp / "actor", state_dict=actor_sd)
        M.save_model(critic, tmp / "critic", state_dict=critic_sd)
        tok.save(str(tmp / "actor" / "tokenizer.json"))
        torch.save(optim, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "args": vars(args)}, indent=1))
        old = out / "checkpoint.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_optimizers(ckpt: Path, actor, critic, actor_opt, critic_opt, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    optim = torch.load(ckpt / "optim.pt", weights_only=True, mmap=True)   # tensors and numbers; read lazily
    opts = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(actor, actor_opt, optim["actor"], options=opts)
    set_optimizer_state_dict(critic, critic_opt, optim["critic"], options=opts)
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"])


def truncate_jsonl(path: Path, last_step: int):
    """Keep the rows up to the checkpoint's step: the resumed run redoes the later ones, identically. (An
    evaluation row at that step was the end of the interrupted run, not a part of the whole one.)"""
    def keep(row):
        return row["step"] < last_step or (row["step"] == last_step and "eval_accuracy" not in row)
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
        path.write_text("".join(r + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = sft.init_distributed()
    torch.manual_seed(args.seed)                  # the critic's fresh value head; every other draw is seeded
    out = Path(args.out)
    log = (lambda msg: tqdm.write(msg)) if rank == 0 else (lambda msg: None)
    ckpt = out / "checkpoint"
    if args.resume and not ckpt.exists() and (out / "checkpoint.old").exists():
        ckpt = out / "checkpoint.old"                            # a crash between the two renames
    resuming = args.resume and (ckpt / "state.json").exists()
    if resuming:                                                 # the reference must be the run's own base
        saved = json.loads((ckpt / "state.json").read_text())["args"]["model"]
        if args.model not in (None, saved):
            raise ValueError(f"{ckpt} was trained from --model {saved}, not {args.model}")
        args.model = saved

    # the data and the starting checkpoint
    if args.model is None:                                       # the CPU demo
        args.model = str(sft.build_demo_base(Path("runs/demo-base"), rank, world, device, log))
    if args.train_data is None:
        train_set = data.make_dose_questions(4096, seed=2)
    else:
        train_set = data.load_medqa(args.train_data)
    eval_set = data.make_dose_questions(256, seed=3) if args.eval_data is None else data.load_medqa(args.eval_data)
    if args.eval_limit:
        eval_set = eval_set[:args.eval_limit]
    tok = data.load_tokenizer(args.model)
    steps = args.steps or len(train_set) // args.rollout_batch
    if args.rollout_batch % world or args.train_batch % world:
        raise ValueError(f"--rollout-batch and --train-batch must be divisible by the world size {world}")
    if (args.rollout_batch // world) % (args.train_batch // world):
        raise ValueError("--rollout-batch must be a multiple of --train-batch")

    def encode(examples):
        ids = [tok.encode(data.build_prompt(ex)).ids for ex in examples]
        too_long = [i for i, p in enumerate(ids) if len(p) > args.max_prompt_len]
        if too_long:
            raise ValueError(f"{len(too_long)} prompts exceed --max-prompt-len {args.max_prompt_len} "
                             f"(the first: example {too_long[0]})")
        return ids
    train_prompts, eval_prompts = encode(train_set), encode(eval_set)

    # actor, critic (value head on the same base), frozen reference; resume from the checkpoint if asked
    start = 0
    if resuming:
        start = json.loads((ckpt / "state.json").read_text())["step"]
        actor_path, critic_path = ckpt / "actor", ckpt / "critic"
    else:
        actor_path = critic_path = Path(args.model)
    actor = M.load_model(actor_path, device=device, dtype=torch.float32)   # fp32 master weights (sft.shard)
    if actor.config.vocab_size < tok.get_vocab_size():
        raise ValueError(f"{args.model}: tokenizer.json has {tok.get_vocab_size()} tokens but the model's "
                         f"vocabulary has {actor.config.vocab_size}")
    critic = M.load_model(critic_path, device=device, dtype=torch.float32, value_head=True)
    actor.model.gradient_checkpointing = critic.model.gradient_checkpointing = args.grad_checkpoint
    actor, critic = sft.shard(actor.train(), world), sft.shard(critic.train(), world)
    ref = sft.shard(M.load_model(args.model, device=device).requires_grad_(False), world)   # bf16 on CUDA
    betas = (0.9, 0.95)                                          # as OpenRLHF
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=args.actor_lr, weight_decay=args.weight_decay, betas=betas)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay, betas=betas)
    if start:
        load_optimizers(ckpt, actor, critic, actor_opt, critic_opt, rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "samples.jsonl"):
            (truncate_jsonl(out / f, start) if start else (out / f).unlink(missing_ok=True))
        log(f"PPO: {args.model}, {M.num_params(actor) / 1e6:.2f}M params, world {world}, steps {start}..{steps}")

    def write(name, row):
        if rank == 0:
            with open(out / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    if start == 0:
        acc, fmt = eval_accuracy(actor, tok, eval_set, eval_prompts, args, rank, world)
        write("metrics.jsonl", {"step": 0, "eval_accuracy": acc, "eval_format": fmt})
        log(f"step 0: eval accuracy {acc:.3f}, valid format {fmt:.3f}")

    perms = {}
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=rank != 0, desc="ppo")
    for step in bar:
        t0 = time.time()
        # this step's prompts: the next rollout_batch of an endless sequence of seeded shuffles of the train set
        idx = []
        for i in range(step * args.rollout_batch, (step + 1) * args.rollout_batch):
            epoch = i // len(train_set)
            if epoch not in perms:
                perms[epoch] = random.Random(args.seed * 7919 + epoch).sample(range(len(train_set)), len(train_set))
            idx.append(perms[epoch][i % len(train_set)])
        idx = idx[rank::world]
        for g in actor_opt.param_groups:
            g["lr"] = sft.lr_at(step, args.actor_lr, args.warmup)
        for g in critic_opt.param_groups:
            g["lr"] = sft.lr_at(step, args.critic_lr, args.warmup)

        exp, stats, texts, scores, t_rollout, t_exp = make_experience(
            actor, critic, ref, tok, [train_set[i] for i in idx], [train_prompts[i] for i in idx], step, args,
            rank, world, device)
        t1 = time.time()
        m = dict(policy_loss=0.0, value_loss=0.0, clip_frac=0.0, entropy=0.0, approx_kl=0.0)
        per_rank = args.train_batch // world
        n_updates = 0
        for epoch in range(args.ppo_epochs):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 31 + epoch)
            order = torch.randperm(len(idx), generator=g).tolist()
            for a in range(0, len(order), per_rank):
                for k, v in ppo_update(actor, critic, actor_opt, critic_opt, exp, order[a:a + per_rank],
                                       args, world).items():
                    m[k] += sft.all_sum(v, world)
                n_updates += 1
        t_train = time.time() - t1

        n = sft.all_sum(stats["n"], world)
        row = {"step": step + 1, "lr": sft.lr_at(step, args.actor_lr, args.warmup)}
        row.update({k: sft.all_sum(stats[k], world) / n for k in
                    ("reward", "accuracy", "format", "truncated", "kl", "direct_answer", "sampler_logprob_err")})
        row["response_length"] = sft.all_sum(stats["response_length"], world) / n
        row.update({k: v / n_updates for k, v in m.items()})
        row.update(time_rollout=t_rollout, time_experience=t_exp, time_train=t_train, time_step=time.time() - t0,
                   tokens_per_s=row["response_length"] * n / max(t_rollout, 1e-9))
        write("metrics.jsonl", row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
        if args.sample_every and (step + 1) % args.sample_every == 0:
            for t, s, i in list(zip(texts, scores, idx))[:4]:
                write("samples.jsonl", {"step": step + 1, "question": train_set[i].question,
                                        "options": train_set[i].options, "answer": train_set[i].answer,
                                        "response": t, "score": s})
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == steps):
            save_checkpoint(out, actor, critic, actor_opt, critic_opt, step + 1, args, rank, world, tok)

    acc, fmt = eval_accuracy(actor, tok, eval_set, eval_prompts, args, rank, world)
    write("metrics.jsonl", {"step": steps, "eval_accuracy": acc, "eval_format": fmt})
    log(f"step {steps}: eval accuracy {acc:.3f}, valid format {fmt:.3f}")
    sft.save(actor, world, rank, tok, out / "final")
    log(f"final policy: {out / 'final'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sft.cli(main)
