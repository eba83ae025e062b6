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
                 GAE(gamma, lambda) gives advantages, whitened over the whole rollout batch (--whiten), and returns;
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
checkpoint.RunFolder's business, and the flags, presets and learning-rate schedule are recipe.py's, so that this
file holds the learning: read it from "the loop" down, then main.
"""
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
import recipe
import reward
import rollout

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
                                    static=args.cuda_graphs == "on", cuda_graph=args.cuda_graphs == "on")
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
    else:                                                        # critic-free: the group is the baseline
        if args.advantage in ("grpo", "rloo"):
            score = ppo.group_scores(score, args.samples_per_prompt, args.advantage, scale_by_std=args.group_std)
        advantages = ppo.discounted_returns(ppo.token_rewards(score, kl, mask, beta), mask, args.gamma)
    if args.whiten and args.advantage in ("gae", "reinforce++"):  # grpo and rloo: their groups are the baseline
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
            factor = recipe.lr_factor(args, step, n_updates, total)
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
    total = recipe.schedule_length(args, len(train_set), steps)            # optimizer steps, for --lr-schedule cosine
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
    row = {"step": step + 1, "lr": args.actor_lr * recipe.lr_factor(args, step, 0, total),      # its first update's
           **{k: common.all_sum(v, world) / n for k, v in sums.items()}, **m}
    return {**row, "time_rollout": t[1] - t[0], "time_experience": t[2] - t[1], "time_train": t[3] - t[2],
            "time_step": t[3] - t[0], "tokens_per_s": row["response_length"] * n / max(t[1] - t[0], 1e-9),
            "peak_mem_mb": common.all_max(common.peak_memory_mb(device), world)}


def held_out(run, actor, tok, held, step, args, rank, world, log):
    """A metrics.jsonl row of held-out accuracy and format (eval_*, ood_*; sampled with --eval-samples), if any set."""
    if not held:
        return
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


def load_examples(args, world):
    """-> (train examples, held-out sets: {"eval": ..., "ood": ...}), read and checked before any model is loaded.
    Without --train-data, the demo's questions, and (unless --eval-data) its held-out sets of both families."""
    train_set = demo.questions("train") if args.train_data is None else data.load_medqa(args.train_data)
    if len(train_set) < args.rollout_batch:
        raise ValueError(f"--train-data {args.train_data}: {len(train_set)} examples, fewer than --rollout-batch "
                         f"{args.rollout_batch}: not one PPO step")
    return train_set, evaluate.held_out_sets(args, world, demo_default=args.train_data is None)


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


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)                      # recipe.py: the demo's defaults, --preset, the rules among flags
    if args.plan:                                 # the memory plan alone: config.json, no weight, no process group
        return print(memory.plan_table(args))
    rank, world, device = common.init_distributed(group=args.precision == "bf16" or args.offload)
    args.precision = "bf16" if common.compute_dtype(args.precision, device) == torch.bfloat16 else "fp32"  # recorded
    if args.cuda_graphs == "auto":                                       # recorded as what runs, like the precision
        args.cuda_graphs = "on" if device.type == "cuda" else "off"
    log = (lambda msg: tqdm.write(msg)) if rank == 0 else (lambda msg: None)

    recipe.check_flags(args, world)      # everything the user gave, before a model is loaded or an output touched
    ckpt, start = checkpoint.find(args, world, recipe.trajectory_flags(args))   # resuming: checkpoint, step; or 0
    if device.type == "cuda" and args.model is not None:          # does it fit? (before any weight is read)
        memory.check_fits(M.Qwen2Config.from_json(args.model), args, world,
                          torch.cuda.get_device_properties(device).total_memory / 1e9)
    train_set, held = load_examples(args, world)
    if args.model is None:                       # the CPU demo: its base (shipped, or built by sft.py) and tokenizer
        args.model = str(demo.base(args.base_seed).resolve())
    tok = data.load_tokenizer(args.model)
    train_prompts = data.encode_prompts(tok, train_set, args.max_prompt_len, args.train_data or "train questions")
    for k, v in held.items():                    # a held-out prompt too long: an error now, not at the first eval
        data.encode_prompts(tok, v, args.max_prompt_len, getattr(args, f"{k}_data") or f"{k} questions")
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


def parse_args(argv=None):
    """The flags (recipe.py), with this file's docstring atop --help."""
    return recipe.parse_args(argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
