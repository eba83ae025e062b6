"""
train.py's recipe: its flags, their defaults, the named presets, and the rules the flags must satisfy together.

The defaults are the CPU demo's (demo.py): a tiny base model, synthetic dose questions, 40 PPO steps. A --preset
puts its values in place of the defaults, so that `train.py --preset med-rlvr --help` shows what will apply; a flag
given explicitly still wins. TRAJECTORY_FLAGS are the flags a resumed run must share with its checkpoint.
Kept apart from train.py, which holds the learning, because this is what a user tunes and the README traces: the
preset's every value to its source.
"""
import argparse
import math
import os

import checkpoint
import common

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


# The flags that decide a run's trajectory: a resumed run must use the checkpoint's values, or it would not continue
# the same run (the data position, the seeds, the optimiser, the reward all derive from them).
TRAJECTORY_FLAGS = ("advantage", "samples_per_prompt", "group_std", "whiten", "kl_in", "rollout_batch", "train_batch",
                    "ppo_epochs", "actor_lr", "critic_lr", "warmup", "weight_decay", "grad_clip", "kl_coef",
                    "kl_estimator", "gamma", "lam", "clip", "value_clip", "loss_agg", "temperature", "top_p",
                    "max_prompt_len", "max_new_tokens", "incorrect_reward", "reward", "seed", "rollout_chunk",
                    "cuda_graphs", "precision", "lr_schedule", "warmup_ratio", "min_lr_ratio")


def trajectory_flags(args) -> list[str]:
    """TRAJECTORY_FLAGS less those that do not apply (the other schedule's, --whiten for grpo and rloo); with the
    cosine, --steps too (it sets its length)."""
    unused = ("warmup_ratio", "min_lr_ratio") if args.lr_schedule == "constant" else ("warmup",)
    unused += ("whiten",) if args.advantage in ("grpo", "rloo") else ()              # their groups are the baseline
    return [k for k in TRAJECTORY_FLAGS if k not in unused] + (["steps"] if args.lr_schedule == "cosine" else [])


def check_flags(args, world):
    """What argparse cannot check alone: hub ids (each becomes its files in the HF cache, recorded as an absolute
    path so that --resume finds them), the flags against each other and the world size, the base checkpoint."""
    for k, kind, split in (("model", "model", None), ("train_data", "data", "train"), ("eval_data", "data", "test"),
                           ("ood_data", "data", "test")):
        if getattr(args, k) is not None:
            setattr(args, k, os.path.abspath(common.from_hub(getattr(args, k), kind, split, world)))
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


# ------------------------------------------------------------------------------------------------ the flags
def make_parser(doc: str = __doc__):
    """train.py's flags; their defaults are the CPU demo (demo.py): its tiny base model, synthetic dose questions."""
    p = common.parser(doc)
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
                                       "named); default: with the demo's questions, 256 dose questions of another "
                                       "seed and 256 of the other family as ood_*; else none")
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
    g.add_argument("--actor-lr", type=c.positive_float, default=2e-4,
                   help="actor AdamW learning rate (the demo: at 5e-4, once the policy is almost deterministic, one "
                        "update in a few runs is large enough to break it for a step; docs/study.md)")
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
    g.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True,
                   help="gae and reinforce++: whiten the advantages over the whole rollout batch (OpenRLHF "
                        "0.5.9). When every response of a batch scores the same, that scales the critic's errors up "
                        "to unit size (docs/study.md); --no-whiten keeps their own scale")
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
    g.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="decode rollouts with a static-shape step captured as a CUDA graph: the same tokens, a decode "
                        "step 7.8x faster on an H200 (python bench.py --device cuda); auto: on with CUDA, off on a "
                        "CPU (where on runs the static step alone)")
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


def parse_args(argv=None, doc: str = __doc__):
    """The flags, a --preset's values in place of the defaults (so --help shows what will apply); explicit flags win.
    `doc`: the script's docstring, whose first paragraph --help shows."""
    p, first = make_parser(doc), argparse.ArgumentParser(add_help=False)       # first: --preset alone, before --help
    first.add_argument("--preset", choices=sorted(PRESETS))
    preset = first.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the schedule
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
