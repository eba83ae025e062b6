"""
Med-RLVR: PPO with a verifiable reward on a base language model.

    torchrun --standalone --nproc_per_node=2 train.py     # the CPU demo: no flags, nothing downloaded, runs/demo/
    python train.py                                       # the same demo in one process

    # the paper's recipe (Qwen2.5-3B base, MedQA), on one 8-GPU node (one GPU: add --offload; --plan says so):
    torchrun --standalone --nproc_per_node=8 train.py --preset med-rlvr --model Qwen/Qwen2.5-3B \\
        --train-data GBaker/MedQA-USMLE-4-options --eval-data GBaker/MedQA-USMLE-4-options:test --out runs/med-rlvr

One PPO step, as OpenRLHF 0.5.9 (which Med-RLVR used) does it:
  1. rollout     each rank samples one response for its share of `rollout_batch` prompts (rollout.generate);
  2. reward      reward.score on "<think>" + response: +1 right, `incorrect_reward` wrong, -1 broken format;
  3. experience  the frozen reference gives ref log-probs, the critic gives values; the per-token reward is
                 -beta * KL(k1) on every response token plus the score on the last one (ppo.token_rewards);
                 GAE(gamma, lambda) gives advantages, whitened over the whole rollout batch, and returns;
  4. learn       `ppo_epochs` passes over minibatches of `train_batch`: the clipped policy loss steps the actor,
                 the clipped value loss steps the critic (AdamW, grad-norm clipping; each optimizer step at its
                 scheduled learning rate: --lr-schedule). Where the KL goes and how the loss is averaged: --kl-in
                 and --loss-agg (the preset: in the reward; per response, then over responses, as 0.5.9).
The old log-probs come from the actor's training forward over the finished sequences (as OpenRLHF), at the
rollout's temperature, so the ratio starts at exactly 1; in fp32 they equal the sampler's own (tested), and the
gap between the two is logged as `sampler_logprob_err` (bf16 decoding drifts a little).
On GPUs actor and critic keep fp32 weights and AdamW state and compute in bf16 (common.py explains why).

Deliberate simplifications: one response per prompt (OpenRLHF's PPO default); a fixed KL coefficient; no
reward or value normalisation. A truncated response (no EOS within max_new_tokens) is scored like any other
(it rarely closes </answer>, so it usually gets -1 for its format), its last token ends the episode (GAE does
not bootstrap past it), and the share of them is logged as `truncated`.

Distributed (common.py): actor, critic and reference are each sharded with FSDP2 per decoder block. Rollouts must
not all-gather every block for every decoded token, and the ranks stop decoding at different times; so before
sampling every FSDP unit gathers its full weights once and keeps them (common.full_weights), and frees them after.
The run's folder - claiming --out, args.json, metrics, checkpoints, trackers, a clean stop on SIGTERM - is
checkpoint.RunFolder's business, so that this file holds the learning: read it from "the loop" down, then main.
"""
import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import common
import data
import demo
import evaluate
import memory
import model as M
import ppo
import reward
import rollout

# ------------------------------------------------------------------------------------------------ presets
PRESETS = {
    # Med-RLVR (arXiv 2502.19655): OpenRLHF 0.5.9 on Qwen2.5-3B base, with 0.5.9's defaults wherever the paper is
    # silent: PPO with a critic, gamma 1, lambda 1, clip 0.2, value clip 0.2, k1 KL (0.01) in the reward, the loss
    # averaged per response, cosine_with_min_lr over the optimizer steps (3% warmup, down to 0.1 lr). The README
    # traces every value to its source, and lists what we do differently and why.
    "med-rlvr": dict(steps=0, rollout_batch=512, train_batch=128, micro_batch=4, ppo_epochs=1,
                     actor_lr=1e-6, critic_lr=9e-6, lr_schedule="cosine", warmup_ratio=0.03, min_lr_ratio=0.1,
                     kl_coef=0.01, kl_estimator="k1", gamma=1.0, lam=1.0, clip=0.2, value_clip=0.2, loss_agg="seq",
                     temperature=1.0, max_prompt_len=1024, max_new_tokens=1024, eval_limit=0, eval_batch=64,
                     rollout_chunk=64, save_every=5, sample_every=1, grad_checkpoint=True),
    # DeepSeekMath's GRPO (arXiv 2402.03300): group-normalised scores, the KL (k3, beta 0.04) in the loss, each
    # response's token-mean averaged over responses, one update per rollout (its groups had 64 responses; 8 here)
    "grpo": dict(advantage="grpo", samples_per_prompt=8, group_std=True, kl_in="loss", kl_estimator="k3",
                 kl_coef=0.04, loss_agg="seq", ppo_epochs=1),
    # Dr. GRPO (arXiv 2503.20783, as its scripts run it): GRPO's length and difficulty biases removed - no division
    # by the group's std, a constant divisor (responses x max-new-tokens) in place of each response's length - and
    # no KL term (beta 0)
    "dr-grpo": dict(advantage="grpo", samples_per_prompt=8, group_std=False, kl_coef=0.0, loss_agg="fixed",
                    ppo_epochs=1),
}


# ------------------------------------------------------------------------------------------------ what one step makes
@dataclass
class Experience:
    """One rank's share of a step's rollouts, ready for PPO. Rows are sequences; P is the prompt width, so
    every response starts at column P of input_ids; the per-token tensors cover the responses only."""
    input_ids: torch.Tensor      # [B, P+R] left-padded prompts + right-padded responses
    attn: torch.Tensor           # [B, P+R] 1 = real token
    mask: torch.Tensor           # [B, R]   1.0 = response token
    P: int
    old_logprobs: torch.Tensor   # [B, R]   log pi_old(token) at the rollout temperature
    ref_logprobs: torch.Tensor   # [B, R]   log pi_ref(token): the KL's other side
    advantages: torch.Tensor     # [B, R]   what the policy loss weighs each token's log-ratio by
    values: torch.Tensor | None  # [B, R]   V_old(state before the token); gae only
    returns: torch.Tensor | None # [B, R]   advantages (raw GAE) + values: the critic's target; gae only
    texts: list[str]             # "<think>" + decoded response, as scored
    scores: list[float]          # the verifiable reward of each response
    kl: torch.Tensor | None = None   # [B, R] the per-token KL estimate (--kl-estimator) between old and reference


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


def response_logprobs(policy, input_ids, attn, P, temperature):
    """(log-probs, entropy) [B, R] of the response tokens under softmax(logits / temperature): position P-1+j
    predicts the token at column P+j. The LM head runs in chunks of positions (model.head_logprobs), so the
    [B, R, V] logits are never held, neither here nor in backward."""
    return policy(input_ids[:, :-1], attention_mask=attn[:, :-1], logits_from=P - 1, logprobs_of=input_ids[:, P:],
                  temperature=temperature)


def response_values(critic, input_ids, attn, P):
    """Values [B, R]: V(state before response token j), read at the same positions as response_logprobs."""
    return critic(input_ids[:, :-1], attention_mask=attn[:, :-1])[:, P - 1:]


def whiten(x, mask, world):
    """ppo.masked_whiten over the whole rollout batch, all ranks together."""
    return ppo.masked_whiten(x, mask, all_sum=dist.all_reduce if world > 1 else None)



# ------------------------------------------------------------------------------------------------ 1. rollout
def sample(actor, prompts, tok, generator, args) -> rollout.Rollout:
    """One response per prompt from the current policy, at the rollout temperature, with its sampler log-probs:
    --rollout-chunk sequences at a time (it bounds the KV cache and the prefill's memory)."""
    chunk = args.rollout_chunk or len(prompts)
    responses, logprobs, finished = [], [], []
    with common.full_weights(actor) as policy:                   # gathered once for the whole rollout (FSDP2)
        for a in range(0, len(prompts), chunk):
            part = rollout.generate(policy, prompts[a:a + chunk], args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, eos_token_id=data.eos_token_id(tok), generator=generator,
                                    static=args.cuda_graphs, cuda_graph=args.cuda_graphs)
            responses += part.responses
            logprobs += part.logprobs
            finished += part.finished
    return rollout.Rollout(responses, logprobs, finished)


# ------------------------------------------------------------------------------------------------ 2. reward
def score_texts(tok, responses, examples, incorrect_reward):
    texts = [data.PROMPT_PREFILL + data.decode(tok, r) for r in responses]
    return texts, [reward.score(t, ex.answer, incorrect_reward) for t, ex in zip(texts, examples)]


def training_scores(scores: list[float], kind: str, incorrect_reward: float, generator) -> list[float]:
    """The scores PPO learns from. "verifiable": reward.score's, the method. The controls, which show whether a
    gain comes from the answer's being checked: "format": a valid format earns +1 whatever its letter (a broken
    one -1); "random": a valid format earns +1 or `incorrect_reward` by a fair coin (seeded with the step's
    sampler, so a resumed run draws the same), independent of the answer."""
    if kind == "verifiable":
        return scores
    if kind == "format":
        return [1.0 if s > -1.0 else -1.0 for s in scores]
    coins = torch.rand(len(scores), generator=generator, device=generator.device).tolist()
    return [-1.0 if s == -1.0 else 1.0 if c < 0.5 else float(incorrect_reward) for s, c in zip(scores, coins)]



# ------------------------------------------------------------------------------------------------ 3. experience
def make_experience(actor, critic, ref, prompts, out: rollout.Rollout, texts, scores, learned, args, world, device):
    """The rollout made ready for PPO: old log-probs (actor), reference log-probs, values (critic), the per-token
    rewards with the KL, and GAE's advantages and returns (or a critic-free estimator's advantages). `learned`: the
    scores PPO learns from; `scores`: the verifiable ones, kept for the metrics."""
    input_ids, attn, mask, P = pack(prompts, out.responses, device)                # mask: [B, R]
    # The old log-probs are recomputed by the same forward that training uses (as OpenRLHF does), so the PPO
    # ratio is exactly 1 on the first minibatch and the KL exactly 0 while actor == reference. In fp32 they equal
    # the sampler's (tested); in bf16 the cached decode drifts a little: logged as sampler_logprob_err.
    old_logprobs, ref_logprobs = torch.zeros_like(mask), torch.zeros_like(mask)  # [B, R]
    values = torch.zeros_like(mask) if critic is not None else None
    with torch.no_grad():
        for a in range(0, len(prompts), args.micro_batch):
            s = slice(a, a + args.micro_batch)
            for net, dest in ((actor, old_logprobs), (ref, ref_logprobs)):
                dest[s] = response_logprobs(net, input_ids[s], attn[s], P, args.temperature)[0]
            if critic is not None:
                values[s] = response_values(critic, input_ids[s], attn[s], P)
    kl = ppo.kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask     # [B, R]
    score = torch.tensor(learned, device=device)                                  # [B]
    # Where the KL goes: by default into the reward of every token (OpenRLHF), where the critic learns it and the
    # returns spread it; with --kl-in loss, into the policy loss instead (ppo_update), and the reward is the score.
    beta = args.kl_coef if args.kl_in == "reward" else 0.0
    returns = None
    if args.advantage == "gae":                                  # PPO: the critic's values are the baseline
        advantages, returns = ppo.compute_gae(ppo.token_rewards(score, kl, mask, beta), values, mask, args.gamma,
                                              args.lam)
        advantages = whiten(advantages, mask, world)
    else:                                                        # critic-free: the group is the baseline
        if args.advantage in ("grpo", "rloo"):
            score = ppo.group_scores(score, args.samples_per_prompt, args.advantage, scale_by_std=args.group_std)
        advantages = ppo.discounted_returns(ppo.token_rewards(score, kl, mask, beta), mask, args.gamma)
        if args.advantage == "reinforce++":
            advantages = whiten(advantages, mask, world)
    return Experience(input_ids, attn, mask, P, old_logprobs, ref_logprobs, advantages, values, returns, texts, scores,
                      kl)


# ------------------------------------------------------------------------------------------------ 4. learn
def ppo_update(actor, critic, actor_opt, critic_opt, exp: Experience, rows, *, micro_batch, temperature, clip,
               value_clip, grad_clip, loss_agg, world, kl_coef=0.0, kl_estimator="k3", horizon=None):
    """Step 4, one optimizer step of the actor (and the critic, unless it is None) on the rows `rows` of this
    rank's experience. kl_coef > 0 adds kl_coef * KL(actor || reference) to the policy loss (--kl-in loss).

    The loss is averaged over the whole minibatch of all ranks ("token": every response token weighs the same;
    "seq": every response does; "fixed": token sums over responses x horizon, the response budget): each
    micro-batch's loss is weighted by its share of the global count (tokens, or responses), and the world size
    undoes FSDP's gradient averaging. Returns the minibatch's metrics, this rank's share of them
    (all_sum them over the ranks), and `skipped` = 1.0 when a non-finite gradient skipped the step."""
    count = (lambda m: float(m.sum())) if loss_agg == "token" else (lambda m: float(len(m)))
    n_global = common.all_sum(count(exp.mask[rows]), world)
    agg = dict(agg=loss_agg, horizon=horizon)
    m = {}
    for a in range(0, len(rows), micro_batch):
        s = rows[a:a + micro_batch]
        ids, attn, mask, P = exp.input_ids[s], exp.attn[s], exp.mask[s], exp.P
        weight = count(mask) / n_global
        logprobs, entropy = response_logprobs(actor, ids, attn, P, temperature)    # [b, R]; rollout's temperature
        pl, clip_frac, approx_kl = ppo.policy_loss(logprobs, exp.old_logprobs[s], exp.advantages[s], mask, clip,
                                                   **agg)
        out = dict(policy_loss=pl, clip_frac=clip_frac, approx_kl=approx_kl)
        if kl_coef:                                                                # the KL as a loss term (GRPO)
            kl = ppo.kl_penalty(logprobs, exp.ref_logprobs[s], kl_estimator)
            out["kl_loss"] = ppo.aggregate(kl, mask, **agg)
            pl = pl + kl_coef * out["kl_loss"]
        (pl * weight * world).backward()
        if critic is not None:
            values = response_values(critic, ids, attn, P)
            out["value_loss"] = ppo.value_loss(values, exp.values[s], exp.returns[s], mask, value_clip, **agg)
            (out["value_loss"] * weight * world).backward()
        with torch.no_grad():
            out["entropy"] = ppo.masked_mean(entropy, mask)
        for k, v in out.items():
            m[k] = m.get(k, 0.0) + float(v.detach()) * weight
    # a NaN or inf anywhere (a diverging loss) skips the step of both models: nothing non-finite reaches a weight
    nets = [(actor, actor_opt)] + ([(critic, critic_opt)] if critic is not None else [])
    m["skipped"] = float(not common.clip_and_step(nets, grad_clip))
    return m


def updates_per_step(args) -> int:
    """Optimizer steps a PPO step makes: ppo_epochs passes over its responses in minibatches of train_batch."""
    return args.ppo_epochs * args.rollout_batch * args.samples_per_prompt // args.train_batch


def schedule_length(args, n_train, steps) -> int:
    """The optimizer steps the cosine spans: with --steps 0, OpenRLHF 0.5.9's max_steps, len(train) * samples //
    train_batch * epochs (79 for MedQA, where it runs, as we do, the 76 of full rollout batches); else all steps'."""
    if args.steps == 0:
        return n_train * args.samples_per_prompt // args.train_batch * args.ppo_epochs
    return steps * updates_per_step(args)


def lr_factor(args, step, update, total) -> float:
    """The learning rate of PPO step `step`'s `update`-th optimizer step, as a share of --actor-lr / --critic-lr
    (--lr-schedule). cosine counts optimizer steps, as OpenRLHF 0.5.9's scheduler, over `total` of them."""
    if args.lr_schedule == "constant":
        return common.lr_at(step, 1.0, args.warmup)
    return common.cosine_lr(step * updates_per_step(args) + update, total, math.ceil(total * args.warmup_ratio),
                            args.min_lr_ratio)


def learn(trained: dict, exp: Experience, step, total, args, world, skipped_in_a_row):
    """Step 4: `ppo_epochs` passes over the experience in minibatches of `train_batch` (this rank's share of each
    minibatch, in a seeded order), each optimizer step at its scheduled learning rate. -> (the metrics averaged
    over the updates, with the number of skipped updates; the count of updates skipped in a row so far). Too many
    skipped in a row stop the run."""
    (actor, actor_opt), (critic, critic_opt) = trained["actor"], trained.get("critic", (None, None))
    m, per_rank, n_updates, n_skipped = {}, args.train_batch // world, 0, 0
    for epoch in range(args.ppo_epochs):
        g = torch.Generator().manual_seed(seed_for("minibatch", args.seed, step, epoch))
        order = torch.randperm(len(exp.scores), generator=g).tolist()
        for a in range(0, len(order), per_rank):
            factor = lr_factor(args, step, n_updates, total)
            for opt, lr in ((actor_opt, args.actor_lr), (critic_opt, args.critic_lr)):
                for group in opt.param_groups if opt is not None else []:
                    group["lr"] = lr * factor
            update = ppo_update(actor, critic, actor_opt, critic_opt, exp, order[a:a + per_rank],
                                micro_batch=args.micro_batch, temperature=args.temperature, clip=args.clip,
                                value_clip=args.value_clip, grad_clip=args.grad_clip, loss_agg=args.loss_agg,
                                world=world, kl_coef=args.kl_coef if args.kl_in == "loss" else 0.0,
                                kl_estimator=args.kl_estimator, horizon=args.max_new_tokens)
            skipped = update.pop("skipped")                 # the same on every rank
            n_skipped += skipped
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            if skipped_in_a_row >= common.SKIP_LIMIT:
                raise common.Abort(f"step {step + 1}: {skipped_in_a_row} updates in a row had a non-finite loss or "
                                   "gradient and were skipped, so the run stops here; nothing non-finite was "
                                   f"written, and {Path(args.out) / 'checkpoint'} (if any) holds the last good "
                                   "state. Lower --actor-lr / --critic-lr.")
            for k, v in update.items():
                m[k] = m.get(k, 0.0) + common.all_sum(v, world)
            n_updates += 1
    return {**{k: v / n_updates for k, v in m.items()}, "skipped_updates": n_skipped}, skipped_in_a_row



# ------------------------------------------------------------------------------------------------ the loop
def train(args, run: checkpoint.RunFolder, trained: dict, ref, tok, train_set, train_prompts, held, start, rank,
          world, device, log):
    """PPO steps from `start` (0, or a resumed run's checkpoint) to the last; held-out evaluations before the first
    step, every --eval-every steps and after the last; then the final policy is exported to <out>/final."""
    steps = args.steps or len(train_set) // args.rollout_batch
    total = schedule_length(args, len(train_set), steps)            # optimizer steps, for --lr-schedule cosine
    actor, critic = trained["actor"][0], trained.get("critic", (None,))[0]
    if start == 0 or (args.eval_every and start % args.eval_every == 0 and start < steps):
        held_out(run, actor, tok, held, start, args, rank, world, log)   # resuming: the row the cut dropped, again
    perms, skipped_in_a_row = {}, 0
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=rank != 0, desc="ppo")
    for step in bar:
        t = [time.time()]
        rows = step_rows(step, len(train_set), args.rollout_batch, args.seed, perms)[rank::world]   # this rank's
        n = args.samples_per_prompt                              # each prompt n times, side by side: a group
        examples, prompts = [train_set[i] for i in rows for _ in range(n)], [train_prompts[i] for i in rows for _ in
                                                                             range(n)]
        gen = torch.Generator(device).manual_seed(seed_for("rollout", args.seed, step, rank))
        # 1. rollout: a response to each prompt from the current policy
        out = sample(actor, prompts, tok, gen, args)
        t.append(time.time())
        # 2. reward: the verifiable score of each response (--reward format / random: what PPO learns instead)
        texts, scores = score_texts(tok, out.responses, examples, args.incorrect_reward)
        learned = training_scores(scores, args.reward, args.incorrect_reward, gen)
        # 3. experience: old and reference log-probs, values, per-token rewards with the KL, advantages, returns
        exp = make_experience(actor, critic, ref, prompts, out, texts, scores, learned, args, world, device)
        t.append(time.time())
        # 4. learn: --ppo-epochs passes of the clipped policy and value losses over minibatches of --train-batch
        m, skipped_in_a_row = learn(trained, exp, step, total, args, world, skipped_in_a_row)
        t.append(time.time())

        row = step_metrics(step, exp, out, examples, learned, m, t, args, total, world, device)
        run.write("metrics.jsonl", row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
        if args.sample_every and (step + 1) % args.sample_every == 0:      # every response of the step
            for text, score, i in common.gather([(x, s, rows[k // n]) for k, (x, s) in
                                                 enumerate(zip(exp.texts, exp.scores))], world):
                q = train_set[i]
                run.write("samples.jsonl", {"step": step + 1, "question": q.question, "options": q.options,
                                            "answer": q.answer, "response": text, "score": score})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            held_out(run, actor, tok, held, step + 1, args, rank, world, log)
        saved = args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == steps)
        if saved:
            run.save(step + 1, trained, tok, args)
        run.stop_if_asked(step + 1, saved, trained, tok, args)      # SIGTERM: a checkpoint, then every rank stops
    run.steps_done()                                                # from here a signal stops at once
    held_out(run, actor, tok, held, steps, args, rank, world, log)
    common.export(actor, tok, Path(args.out) / "final", rank, world, args.export_dtype)
    log(f"final policy: {Path(args.out) / 'final'}")


TIMING_KEYS = ("time_rollout", "time_experience", "time_train", "time_step", "tokens_per_s", "peak_mem_mb")


def step_metrics(step, exp: Experience, out, examples, learned, m, t, args, total, world, device) -> dict:
    """A step's row of metrics.jsonl: means over all ranks' responses, the learning's averages (m), timings."""
    sampler = torch.zeros_like(exp.mask)                                                      # [B, R]
    for i, lp in enumerate(out.logprobs):
        sampler[i, :len(lp)] = lp.to(device)
    sums = dict(reward=sum(learned), accuracy=sum(s == 1.0 for s in exp.scores),
                format=sum(s > -1.0 for s in exp.scores), truncated=sum(not f for f in out.finished),
                kl=float(ppo.masked_mean(exp.kl, exp.mask, dim=-1).sum()),
                # the paper's "direct answer hacker" stage: the answer shows up early in the think block
                direct_answer=sum(reward.classify(x, ex.options) == reward.DIRECT_ANSWER
                                  for x, ex in zip(exp.texts, examples)),
                sampler_logprob_err=float(ppo.masked_mean((sampler - exp.old_logprobs).abs(), exp.mask, dim=-1).sum()),
                response_length=float(exp.mask.sum()))
    n = common.all_sum(len(exp.scores), world)
    row = {"step": step + 1, "lr": args.actor_lr * lr_factor(args, step, 0, total),      # its first update's
           **{k: common.all_sum(v, world) / n for k, v in sums.items()}, **m}
    return {**row, "time_rollout": t[1] - t[0], "time_experience": t[2] - t[1], "time_train": t[3] - t[2],
            "time_step": t[3] - t[0], "tokens_per_s": row["response_length"] * n / max(t[1] - t[0], 1e-9),
            "peak_mem_mb": common.all_max(common.peak_memory_mb(device), world)}


def held_out(run, actor, tok, held, step, args, rank, world, log):
    """A metrics.jsonl row of held-out accuracy and format (eval_*, ood_*; sampled with --eval-samples)."""
    row = {"step": step, **evaluate.held_out_row(actor, tok, held, samples=args.eval_samples, batch=args.eval_batch,
                                                 max_new_tokens=args.max_new_tokens, rank=rank, world=world)}
    run.write("metrics.jsonl", row)
    log(f"step {step}: " + ", ".join(f"{k} accuracy {row[f'{k}_accuracy']:.3f}, valid format "
                                     f"{row[f'{k}_format']:.3f}" for k in held))


# ------------------------------------------------------------------------------------------------ setup
def seed_for(kind: str, seed: int, i: int, j: int = 0) -> int:
    """Every random draw after the value head's init comes from a generator seeded here from --seed and the
    position in the run, so that a resumed run draws exactly what an uninterrupted one would.
      "data"       the shuffle of pass i over the train set
      "rollout"    the sampler of step i on rank j
      "minibatch"  the minibatch order of step i, PPO epoch j
    The multipliers are primes larger than what they multiply ever reaches in practice (1009 ranks, 31 PPO
    epochs), so two different positions never share a seed."""
    if kind == "data":
        return seed * 7919 + i
    if kind == "rollout":
        return seed * 1_000_003 + i * 1009 + j
    if kind == "minibatch":
        return seed * 1_000_003 + i * 31 + j
    raise ValueError(f"seed_for: unknown kind {kind!r}")


# The flags that decide a run's trajectory: a resumed run must use the checkpoint's values, or it would not continue
# the same run (the data position, the seeds, the optimiser, the reward all derive from them).
TRAJECTORY_FLAGS = ("advantage", "samples_per_prompt", "group_std", "kl_in", "rollout_batch", "train_batch",
                    "ppo_epochs", "actor_lr", "critic_lr", "warmup", "weight_decay", "grad_clip", "kl_coef",
                    "kl_estimator", "gamma", "lam", "clip", "value_clip", "loss_agg", "temperature", "top_p",
                    "max_prompt_len", "max_new_tokens", "incorrect_reward", "reward", "seed", "rollout_chunk",
                    "cuda_graphs", "precision", "lr_schedule", "warmup_ratio", "min_lr_ratio")




def check_flags(args, world):
    """What argparse cannot check alone: flags against each other and the world size."""
    if args.rollout_batch % world or args.train_batch % world:
        raise ValueError(f"--rollout-batch {args.rollout_batch} and --train-batch {args.train_batch} must be "
                         f"divisible by the world size {world}")
    if args.rollout_batch * args.samples_per_prompt % args.train_batch:
        raise ValueError(f"--rollout-batch {args.rollout_batch} x --samples-per-prompt {args.samples_per_prompt} "
                         f"responses must be a multiple of --train-batch {args.train_batch}")
    if args.advantage in ("grpo", "rloo") and args.samples_per_prompt < 2:
        raise ValueError(f"--advantage {args.advantage} compares the responses to one prompt: give "
                         "--samples-per-prompt 2 or more")
    if args.kl_in == "loss" and args.kl_estimator == "k1":
        raise ValueError("--kl-in loss needs --kl-estimator k2 or k3: as a loss, k1's gradient is zero in expectation "
                         "(per position, at tokens from the policy; k2's is that of KL(pi||ref), k3's of KL(ref||pi))")
    if args.advantage in ("grpo", "rloo") and args.gamma != 1.0:
        raise ValueError(f"--advantage {args.advantage} with --gamma {args.gamma}: discounting a score shifted by "
                         "its group's baseline makes the advantage depend on the response's length; use --gamma 1 "
                         "(later OpenRLHF releases force it)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    checkpoint.check_trackers(args.wandb, args.tensorboard)
    if args.model is not None:                                   # a missing or broken checkpoint, named, now
        common.check_checkpoint(args.model)


def load_examples(args):
    """-> (train examples, held-out sets: {"eval": ..., "ood": ...; "ood" with --ood-data or the demo's other
    family}), read and checked before any model is loaded."""
    train_set = demo.questions("train") if args.train_data is None else data.load_medqa(args.train_data)
    held = demo.held_out() if args.eval_data is None else {"eval": data.load_medqa(args.eval_data)}
    if args.ood_data is not None:                # MMLU-Pro: its --ood-category rows (other schemas have none)
        held["ood"] = data.load_mmlu_pro(args.ood_data, category=args.ood_category)
    held = {k: v[:args.eval_limit or None] for k, v in held.items()}
    if len(train_set) < args.rollout_batch:
        raise ValueError(f"--train-data {args.train_data}: {len(train_set)} examples, fewer than --rollout-batch "
                         f"{args.rollout_batch}: not one PPO step")
    return train_set, held


def encode_prompts(examples, tok, max_prompt_len, what):
    ids = [e.ids for e in tok.encode_batch([data.build_prompt(ex) for ex in examples])]   # batched: 2x faster
    too_long = [i for i, p in enumerate(ids) if len(p) > max_prompt_len]
    if too_long:
        raise ValueError(f"{what}: {len(too_long)} prompts exceed --max-prompt-len {max_prompt_len} "
                         f"(the first: example {too_long[0] + 1})")
    return ids


def build_models(args, ckpt, rank, world, device):
    """-> (trained, ref): the trained models, name -> (model, AdamW), in fp32 from the base (resuming: then
    overwritten by the checkpoint's shards): the actor, and for gae the critic (a value head on the same base;
    critic-free estimators build none); and the frozen reference."""
    trained, dtype = {}, common.compute_dtype(args.precision, device)     # the compute dtype; the reference's too
    for name, lr in (("actor", args.actor_lr), ("critic", args.critic_lr)):
        if name == "critic" and args.advantage != "gae":
            continue
        net = M.load_model(args.model, device=device, dtype=torch.float32,
                           value_head=name == "critic")                # fp32 master weights (common.shard)
        net.model.gradient_checkpointing = args.grad_checkpoint
        net = common.shard(net.train(), world, dtype, args.offload)
        trained[name] = (net, torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=args.weight_decay,
                                                betas=(0.9, 0.95)))                  # betas as OpenRLHF
    ref = common.shard(M.load_model(args.model, device=device, dtype=dtype).requires_grad_(False), world, dtype)
    if ckpt:                                                     # resuming, part 2
        checkpoint.restore(ckpt, trained, rank)
    return trained, ref


def step_rows(step, n_train, rollout_batch, seed, perms):
    """The train-set rows of one step: the next rollout_batch of an endless sequence of seeded shuffles."""
    rows = []
    for i in range(step * rollout_batch, (step + 1) * rollout_batch):
        epoch = i // n_train
        if epoch not in perms:
            perms[epoch] = random.Random(seed_for("data", seed, epoch)).sample(range(n_train), n_train)
        rows.append(perms[epoch][i % n_train])
    return rows


def encode_all(args, train_set, held):
    """-> (tokenizer, train prompt ids); a prompt longer than --max-prompt-len, held out or not, is an error."""
    tok = data.load_tokenizer(args.model)
    for k, v in held.items():
        encode_prompts(v, tok, args.max_prompt_len, getattr(args, f"{k}_data") or f"{k} questions")
    return tok, encode_prompts(train_set, tok, args.max_prompt_len, args.train_data or "train questions")




# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    if args.plan:                                 # the memory plan alone: config.json, no weight, no process group
        return print(memory.plan_table(args))
    rank, world, device = common.init_distributed(group=args.precision == "bf16" or args.offload)
    args.precision = "bf16" if common.compute_dtype(args.precision, device) == torch.bfloat16 else "fp32"  # recorded
    log = (lambda msg: tqdm.write(msg)) if rank == 0 else (lambda msg: None)

    # everything the user gave is checked before a model is loaded or an output touched
    for k, kind, split in (("model", "model", None), ("train_data", "data", "train"), ("eval_data", "data", "test"),
                           ("ood_data", "data", "test")):
        if getattr(args, k) is not None:    # a hub id becomes its files in the HF cache; recorded absolute (resume;
            setattr(args, k, os.path.abspath(common.from_hub(getattr(args, k), kind, split, world)))   # no blob)
    check_flags(args, world)
    unused = ("warmup_ratio", "min_lr_ratio") if args.lr_schedule == "constant" else ("warmup",)
    flags = [k for k in TRAJECTORY_FLAGS if k not in unused] + (["steps"] if args.lr_schedule == "cosine" else [])
    ckpt, start = checkpoint.find(args, world, flags)   # resuming: the checkpoint and its step; (None, 0): fresh
    if device.type == "cuda" and args.model is not None:          # does it fit? (before any weight is read)
        memory.check_fits(M.Qwen2Config.from_json(args.model), args, world,
                          torch.cuda.get_device_properties(device).total_memory / 1e9)
    train_set, held = load_examples(args)
    if args.model is None:                       # the CPU demo: its base (shipped, or built by sft.py) and tokenizer
        args.model = str(demo.base(args.base_seed).resolve())
    tok, train_prompts = encode_all(args, train_set, held)
    run = checkpoint.RunFolder(args, rank, world, start, log)    # --out is ours now (refused if another run's)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(args.seed)    # the critic's fresh value head (every other draw uses seed_for), seeded here
        trained, ref = build_models(args, ckpt, rank, world, device)
        run.begin(args, world)
        log(f"PPO: {args.model}, {M.num_params(trained['actor'][0]) / 1e6:.2f}M params, world {world}, "
            f"steps {start}..{args.steps or len(train_set) // args.rollout_batch}")
        train(args, run, trained, ref, tok, train_set, train_prompts, held, start, rank, world, device, log)
    finally:
        run.close()
    common.finish(world)


# ------------------------------------------------------------------------------------------------ flags
def make_parser():
    """The defaults are the CPU demo (demo.py): its tiny base model, synthetic dose questions."""
    p = common.parser(__doc__)
    c = common
    g = p.add_argument_group("the run: recipe, model, data, output")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe; flags given explicitly still win")
    g.add_argument("--model", help="base checkpoint: a folder (HF layout) or a hub id (Qwen/Qwen2.5-3B); default: the "
                                   "CPU demo's tiny base model (demo.py): --base-seed 0 is shipped in demo_base/")
    g.add_argument("--base-seed", type=int, default=0, help="the demo: which base build (its weights' seed; N != 0: "
                                                           "runs/demo-base-seed<N>, built by sft.py --build-base)")
    g.add_argument("--train-data", help="MedQA train split: a file (data.SCHEMAS) or a hub id, org/name[:split] "
                                        "(GBaker/MedQA-USMLE-4-options); default: synthetic dose questions")
    g.add_argument("--eval-data", help="held-out questions for eval_accuracy: a file or a hub id (split test unless "
                                       "named); default: 256 dose questions of another seed, and 256 of the other "
                                       "family as ood_*")
    g.add_argument("--out", default="runs/demo", help="run folder: metrics.jsonl, samples.jsonl, checkpoint/, final/")
    g = p.add_argument_group("PPO: steps, batches, optimisation")
    g.add_argument("--steps", type=c.nonneg_int, default=40,
                   help="PPO steps; 0 = one pass over the train data (the demo: its held-out accuracy has risen by step "
                        "20 and settled by 40, which fits 3 minutes on 2 CPU cores)")
    g.add_argument("--rollout-batch", type=c.positive_int, default=64,
                   help="prompts sampled per step, all ranks together (--samples-per-prompt responses each)")
    g.add_argument("--train-batch", type=c.positive_int, default=32,
                   help="sequences per optimizer step, all ranks together")
    g.add_argument("--micro-batch", type=c.positive_int, default=32,
                   help="sequences per forward/backward on one rank (memory, not maths)")
    g.add_argument("--ppo-epochs", type=c.positive_int, default=2, help="passes over each step's experience")
    g.add_argument("--actor-lr", type=c.positive_float, default=5e-4, help="actor AdamW learning rate")
    g.add_argument("--critic-lr", type=c.positive_float, default=1e-3, help="critic AdamW learning rate")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant: linear warmup over --warmup PPO steps, then constant; cosine: OpenRLHF 0.5.9's, per "
                        "optimizer step: linear from 0 over the first --warmup-ratio of them, then a half cosine down "
                        "to --min-lr-ratio x lr")
    g.add_argument("--warmup", type=c.nonneg_int, default=3, help="constant: PPO steps of linear warmup")
    g.add_argument("--warmup-ratio", type=c.prob_float, default=0.03, help="cosine: share of updates warming up")
    g.add_argument("--min-lr-ratio", type=c.prob_float, default=0.1, help="cosine: the last lr, a share of the lr")
    g.add_argument("--weight-decay", type=c.nonneg_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=c.positive_float, default=1.0, help="gradient-norm clip, actor and critic")
    g = p.add_argument_group("the advantage estimator and the KL")
    g.add_argument("--advantage", choices=["gae", "grpo", "rloo", "reinforce++"], default="gae",
                   help="gae: PPO with a critic (Med-RLVR); critic-free: grpo (OpenRLHF's group_norm; --preset grpo "
                        "for DeepSeekMath's form), rloo (OpenRLHF's), reinforce++ (OpenRLHF 0.5.9's reinforce); "
                        "ppo.py says which reference each equals")
    g.add_argument("--samples-per-prompt", type=c.positive_int, default=1,
                   help="responses sampled per prompt, a group (grpo and rloo need >= 2)")
    g.add_argument("--group-std", action=argparse.BooleanOptionalAction, default=True,
                   help="grpo: divide by the group's score std (--no-group-std: Dr. GRPO)")
    g.add_argument("--kl-coef", type=c.nonneg_float, default=0.01, help="beta: weight of the per-token KL penalty")
    g.add_argument("--kl-in", choices=["reward", "loss"], default="reward",
                   help="reward: -beta*KL in every token's reward (OpenRLHF); loss: beta*KL added to the policy "
                        "loss (GRPO; needs k2 or k3)")
    g.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default="k1",
                   help="k1 = log pi - log pi_ref (OpenRLHF's default), k2 = k1^2 / 2, k3 = Schulman's positive "
                        "unbiased estimator; as a loss k2's gradient is KL(pi||ref)'s, k3's KL(ref||pi)'s")
    g.add_argument("--gamma", type=c.prob_float, default=1.0, help="GAE discount")
    g.add_argument("--lam", type=c.prob_float, default=1.0, help="GAE lambda (OpenRLHF 0.5.9's default is 1)")
    g.add_argument("--clip", type=c.positive_float, default=0.2, help="PPO ratio clip epsilon")
    g.add_argument("--value-clip", type=c.positive_float, default=0.2, help="value clip around the old values")
    g.add_argument("--loss-agg", choices=["token", "seq", "fixed"], default="token",
                   help="token: token-mean over the minibatch; seq: mean per response, then over responses "
                        "(OpenRLHF 0.5.9, the preset); fixed: token sum / (responses x --max-new-tokens) (Dr. GRPO)")
    g = p.add_argument_group("rollouts and the reward")
    g.add_argument("--temperature", type=c.positive_float, default=1.0, help="sampling temperature of rollouts")
    g.add_argument("--top-p", type=c.unit_float, default=1.0, help="nucleus sampling; keep 1 for training")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="decode with a static-shape step captured as a CUDA graph (same tokens; off until measured "
                        "on a GPU: python bench.py --device cuda); on a CPU the static step alone")
    g.add_argument("--rollout-chunk", type=c.nonneg_int, default=0,
                   help="sequences decoded together on one rank (memory: KV cache, prefill); 0: the rank's whole share")
    g.add_argument("--max-prompt-len", type=c.positive_int, default=1024,
                   help="longest prompt in tokens; a longer one is an error, never cut")
    g.add_argument("--max-new-tokens", type=c.positive_int, default=40,
                   help="response budget; a response without EOS by then is truncated")
    g.add_argument("--incorrect-reward", type=c.any_float, default=0.0,
                   help="reward of a valid format with a wrong answer; -1 is the paper's ablation")
    g.add_argument("--reward", choices=["verifiable", "format", "random"], default="verifiable",
                   help="verifiable: the method; the controls: format (a valid format pays +1, whatever the letter), "
                        "random (a valid format pays +1 or --incorrect-reward by a fair coin); accuracy is logged "
                        "from the verifiable reward either way")
    g = p.add_argument_group("held-out evaluation")
    g.add_argument("--ood-data", help="out-of-distribution questions, evaluated with --eval-data and logged as "
                                      "ood_accuracy / ood_format: a file or a hub id (TIGER-Lab/MMLU-Pro)")
    g.add_argument("--ood-category", default="health", help="--ood-data in MMLU-Pro's schema: the category kept")
    g.add_argument("--eval-limit", type=c.nonneg_int, default=256, help="first N of each held-out set (0: all)")
    g.add_argument("--eval-batch", type=c.positive_int, default=64, help="prompts per held-out decoding batch")
    g.add_argument("--eval-samples", type=c.nonneg_int, default=0, help="also K responses per held-out question at "
                   "temperature 1: eval_sampled_accuracy / _format (each K one more decode of every held-out set)")
    g.add_argument("--eval-every", type=c.nonneg_int, default=0,
                   help="also evaluate every N steps (0: only before the first step and after the last)")
    g = p.add_argument_group("checkpoints, hardware, logging")
    g.add_argument("--save-every", type=c.nonneg_int, default=20,
                   help="write checkpoint/ every N steps and after the last (0: never)")
    g.add_argument("--sample-every", type=c.nonneg_int, default=5,
                   help="append all of a step's responses to samples.jsonl every N steps (0: never)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, the samplers and the value head")
    g.add_argument("--export-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the final policy in <out>/final (checkpoints keep fp32)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (deletes it)")
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in backward (long sequences on GPUs)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help=common.PRECISION_HELP)
    g.add_argument("--offload", action="store_true", help="actor and critic weights, gradients and AdamW states in "
                                                          "host memory, the optimizer step on the CPU (one GPU)")
    g.add_argument("--plan", action="store_true", help="print the memory plan (1-8 GPUs, --offload or not); exit")
    g.add_argument("--wandb", metavar="PROJECT", help="also send metrics (and sampled responses) to this W&B project")
    g.add_argument("--tensorboard", metavar="DIR", help="also write the metrics as TensorBoard events into DIR")
    return p


def parse_args(argv=None):
    """The flags, a --preset's values in place of the defaults (so --help shows what will apply); explicit flags win."""
    p, first = make_parser(), argparse.ArgumentParser(add_help=False)       # first: --preset alone, before --help
    first.add_argument("--preset", choices=sorted(PRESETS))
    preset = first.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)



if __name__ == "__main__":
    common.cli(main)
