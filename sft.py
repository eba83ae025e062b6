"""
Supervised fine-tuning: prompt -> response, cross-entropy on the response tokens only.

Med-RLVR's SFT baseline: the base model trained on the RL training questions to answer directly. The prompt is
data.build_prompt(question) (the same as RL's); the response is " </think>\\n<answer>X</answer>" + EOS, an empty
think block and the gold letter, since MedQA has no written rationales. With no flags: the CPU demo's baseline, from
its shipped base (demo_base/) on the demo's training questions, into runs/demo-sft. The same loop (`train`) builds
the demo's base model from its corpus (--build-base DIR: demo.build_base).

After every epoch the baseline is evaluated on held-out questions (--eval-data / --ood-data; the demo: its two
held-out families), greedy and with --eval-samples K sampled, one row per epoch in <out>/metrics.jsonl, as train.py
logs its steps: `python evaluate.py --budgets` sets the two side by side. After the row a checkpoint (weights and
AdamW states, <out>/checkpoint) is written, so --resume continues a killed run from its last epoch, or a finished
one to a larger --epochs.

    torchrun --standalone --nproc_per_node=2 sft.py                                        # the demo's baseline
    torchrun --standalone --nproc_per_node=8 sft.py --model Qwen2.5-3B --train-data medqa/train.jsonl --out runs/sft

Under torchrun the model is sharded with FSDP2 (common.py). The loss is a token-mean over the *global* batch:
each rank sums its tokens' losses and divides by the token count of all ranks, times the world size, because
FSDP averages gradients over ranks. So N processes make exactly the update one process makes.
"""
import argparse
import functools
import random
from pathlib import Path

import torch

import checkpoint
import common
import data
import demo
import evaluate
import memory
import model as M

# ------------------------------------------------------------------------------------------------ flags
def make_parser():
    p = common.parser(__doc__)
    p.add_argument("--model", help="base checkpoint folder (HF layout: config.json, *.safetensors, tokenizer.json) "
                                   "or a hub id (Qwen/Qwen2.5-3B); "
                                   "default: the CPU demo's base model (demo_base/), with DEMO_BASELINE's "
                                   "settings for the flags not given")
    p.add_argument("--train-data", help="MedQA train split: a file (data.SCHEMAS) or a hub id, org/name[:split]; "
                                   "default with the demo: its RL training "
                                   "questions")
    common.renamed(p, "--train", "--train-data")
    p.add_argument("--out", help="where the fine-tuned model is written (HF layout); default: runs/demo-sft for the "
                                 "demo, runs/sft with --model")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (written "
                                                         "after every epoch); --epochs may grow")
    p.add_argument("--epochs", type=common.positive_int, default=2, help="passes over the train set")
    p.add_argument("--batch", type=common.positive_int, default=64, help="examples per optimizer step, all ranks")
    p.add_argument("--micro-batch", type=common.positive_int, default=8,
                   help="examples per forward/backward on one rank (memory, not maths)")
    p.add_argument("--lr", type=common.positive_float, default=1e-5, help="AdamW learning rate after warmup")
    p.add_argument("--warmup", type=common.nonneg_int, default=20, help="steps of linear learning-rate warmup")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=common.positive_float, default=1.0, help="gradient-norm clip")
    p.add_argument("--max-len", type=common.positive_int, default=1024,
                   help="longest prompt + response in tokens; a longer example is an error, never cut")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block's activations in backward")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help=common.PRECISION_HELP)
    p.add_argument("--offload", action="store_true", help="weights, gradients and AdamW states in host memory, the "
                                                          "optimizer step on the CPU (FSDP2's CPUOffloadPolicy)")
    p.add_argument("--plan", action="store_true", help="print the memory plan (1-8 GPUs, --offload or not); exit")
    p.add_argument("--base-seed", type=int, default=0, help="the demo: which base build (0: the shipped demo_base/; N: "
                                                           "runs/demo-base-seed<N>, made by --build-base)")
    p.add_argument("--build-base", metavar="DIR", help="instead of fine-tuning: build the demo's base model of "
                                                       "--base-seed into DIR with this file's loop, until its lookup "
                                                       "forms (demo.build_base; demo_base: the shipped build 0)")
    p.add_argument("--eval-data", help="held-out questions evaluated after every epoch (<out>/metrics.jsonl): a file "
                                       "or a hub id (split test unless named); the demo: its own two held-out sets")
    p.add_argument("--ood-data", help="out-of-distribution questions evaluated with them (TIGER-Lab/MMLU-Pro)")
    p.add_argument("--ood-category", default="health", help="--ood-data in MMLU-Pro's schema: the category kept")
    p.add_argument("--eval-limit", type=common.nonneg_int, default=256, help="first N of each held-out set (0: all)")
    p.add_argument("--eval-samples", type=common.nonneg_int, default=0,
                   help="also K responses per held-out question at temperature 1 (eval_sampled_accuracy, ...)")
    p.add_argument("--eval-batch", type=common.positive_int, default=64, help="prompts per decoding batch")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=1024, help="held-out response budget")
    return p


def parse_args(argv=None):
    p, first = make_parser(), argparse.ArgumentParser(add_help=False)       # first: --model alone, before --help
    first.add_argument("--model")
    if first.parse_known_args(argv)[0].model is None:             # the demo: its settings, as a preset (--help too)
        p.set_defaults(**DEMO_BASELINE)
    args = p.parse_args(argv)
    if (args.model is None) != (args.train_data is None) and not args.plan:
        p.error("give both --model DIR and --train-data FILE (MedQA jsonl), or neither (the CPU demo)")
    args.out = args.out or ("runs/demo-sft" if args.model is None else "runs/sft")
    return args


# The CPU demo's SFT baseline: its settings, as a preset (with no --model)
DEMO_BASELINE = dict(epochs=2, batch=64, micro_batch=64, lr=1e-3, warmup=5, grad_checkpoint=False,
                     max_new_tokens=40)                                                  # train.py's demo budget


# ------------------------------------------------------------------------------------------------ the loss
def collate(pairs: list[tuple[list[int], list[int]]], device):
    """(prompt ids, response ids) pairs -> input_ids [B, T] and loss_mask [B, T], right-padded.

    Right padding needs no attention mask: under causal attention a real token never sees the pads after it,
    and positions count from 0 either way. loss_mask[b, t] = 1 where token t is a response token (a target)."""
    T = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.zeros(len(pairs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(pairs), T)
    for i, (p, r) in enumerate(pairs):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        loss_mask[i, len(p):len(p) + len(r)] = 1.0
    return input_ids.to(device), loss_mask.to(device)


def response_loss_sum(model, input_ids, loss_mask):
    """Sum over response tokens of -log p(token | everything before it). Position t predicts token t+1; the LM
    head skips the positions before the first response token of the batch (MedQA: ~300 prompt, ~10 response) and
    runs a chunk of positions at a time (model.head_logprobs, as PPO's): the [B, T, V] logits are never held."""
    start = int(loss_mask[:, 1:].any(0).nonzero()[0])                               # first position with a target
    logprobs, _ = model(input_ids[:, :-1], logits_from=start, logprobs_of=input_ids[:, 1 + start:])  # [B, T-1-start]
    return -(logprobs * loss_mask[:, 1 + start:]).sum()


def make_optimizer(model, lr, weight_decay):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def train(model, pairs, *, epochs, batch, micro_batch, lr, warmup, weight_decay=0.0, grad_clip=1.0, seed=0,
          rank=0, world=1, device="cpu", log=print, after_epoch=None, anneal=0, opt=None, start_epoch=0):
    """AdamW over `epochs` passes of the (prompt ids, response ids) pairs, `batch` pairs per optimizer step
    (split over the ranks, then into micro-batches; a last partial batch of a pass is left out).
    after_epoch(epoch, examples, response_tokens) is called on every rank after each pass, with the examples and
    response tokens trained on so far; when it returns True, training stops there, or with `anneal` = n goes on for
    n more passes while the learning rate falls linearly to 0 (warmup-stable-decay: the demo's base builds so). The
    learning rate after warmup is otherwise constant and pass e's order depends on seed + e alone, so the model after
    pass e of a longer run is the model of an --epochs e run, and a run resumed after pass e (`start_epoch`, with
    its optimizer `opt`) goes on as the uninterrupted one. Returns the mean loss of each step."""
    if batch % world:
        raise ValueError(f"--batch {batch} must be divisible by the world size {world}")
    opt = opt or make_optimizer(model, lr, weight_decay)
    steps_per_epoch = len(pairs) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} training examples, fewer than --batch {batch}: not one optimizer step")

    @functools.lru_cache(maxsize=1)
    def order(epoch):                        # pass `epoch`'s rows, in batches: the same on every rank
        rows = list(range(len(pairs)))
        random.Random(seed + epoch).shuffle(rows)
        return rows[:steps_per_epoch * batch]
    first = start_epoch * steps_per_epoch                                           # resuming: the passes done
    seen = [first * batch, sum(len(pairs[j][1]) for e in range(start_epoch) for j in order(e))]  # examples, tokens
    losses, skipped_in_a_row = [], 0
    step, end, decay_from = first, epochs * steps_per_epoch, None   # annealing: the lr decays from decay_from to end
    while step < end:
        epoch, i = divmod(step, steps_per_epoch)
        rows = order(epoch)[i * batch:(i + 1) * batch]
        seen = [seen[0] + len(rows), seen[1] + sum(len(pairs[j][1]) for j in rows)]
        mine = [pairs[j] for j in rows][rank::world]
        n_tokens = common.all_sum(sum(len(r) for _, r in mine), world)                     # response tokens, all ranks
        total = 0.0
        for k in range(0, len(mine), micro_batch):
            input_ids, loss_mask = collate(mine[k:k + micro_batch], device)
            loss = response_loss_sum(model, input_ids, loss_mask) / n_tokens
            (loss * world).backward()                                               # FSDP averages over ranks
            total += loss.item()
        for group in opt.param_groups:       # annealing: linear, from lr at its first step to lr / its length
            group["lr"] = (common.lr_at(step, lr, warmup) if decay_from is None
                           else lr * (end - step) / (end - decay_from))
        skipped_in_a_row = 0 if common.clip_and_step([(model, opt)], grad_clip) else skipped_in_a_row + 1
        if skipped_in_a_row and rank == 0:
            log(f"sft step {step + 1}: non-finite gradient, step skipped")
        if skipped_in_a_row >= common.SKIP_LIMIT:
            raise common.Abort(f"sft step {step + 1}: {skipped_in_a_row} steps in a row had a non-finite loss or "
                               "gradient; nothing was saved. Lower --lr.")
        losses.append(common.all_sum(total, world))
        if rank == 0 and (step % 10 == 0 or step == end - 1):
            log(f"sft step {step + 1}/{end}  loss {losses[-1]:.4f}")
        if after_epoch and i == steps_per_epoch - 1 and decay_from is None and after_epoch(epoch + 1, *seen):
            if not anneal:
                break
            decay_from, end = step + 1, step + 1 + anneal * steps_per_epoch
        step += 1
    return losses


def medqa_pair(example) -> tuple[str, str]:
    """The SFT baseline's (prompt, response): RL's prompt, then an empty think block and the gold letter."""
    return data.build_prompt(example), f" </think>\n<answer>{example.answer}</answer>{data.EOS_TOKEN}"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    if args.plan:                                 # the memory plan alone: config.json, no weight, no process group
        return print(memory.plan_table(args))
    if args.resume and (args.overwrite or args.build_base):
        raise ValueError(f"--resume with {'--overwrite' if args.overwrite else '--build-base'}: choose one")
    rank, world, device = common.init_distributed(group=args.precision == "bf16" or args.offload)
    if args.build_base:                                      # the demo's base: pre-trained by the same loop
        demo.build_base(args.build_base, train, rank, world, device, seed=args.base_seed)
        return common.finish(world)
    torch.manual_seed(args.seed)
    fine_tune(args, rank, world, device)
    common.finish(world)


# The flags that decide where a run goes: a resumed run must use its checkpoint's values (--epochs may grow)
TRAJECTORY_FLAGS = ("batch", "lr", "warmup", "weight_decay", "grad_clip", "seed", "max_len", "precision", "base_seed")


def fine_tune(args, rank, world, device):
    """The SFT baseline: data and base checked (before --out is touched), the model sharded, `train` with an
    evaluation and a checkpoint after every epoch, the model exported in HF layout to --out."""
    is_demo = args.model is None
    if args.model is not None:                                   # a hub id becomes its files in the HF cache
        args.model = str(Path(common.from_hub(args.model, "model", world=world)).resolve())
        common.check_checkpoint(args.model)                      # before any work
        if device.type == "cuda":                                # does it fit? (before any weight is read)
            memory.check_fits(M.Qwen2Config.from_json(args.model), args, world,
                              torch.cuda.get_device_properties(device).total_memory / 1e9)
    args.precision = "bf16" if common.compute_dtype(args.precision, device) == torch.bfloat16 else "fp32"  # recorded
    ckpt, start = checkpoint.find(args, world, TRAJECTORY_FLAGS)  # resuming: the checkpoint and its epoch
    if start > args.epochs:
        raise ValueError(f"--resume: {ckpt} is after epoch {start}, past --epochs {args.epochs}")
    held = evaluate.held_out_sets(args, world, demo_default=is_demo)   # evaluated after every epoch
    if is_demo:                                                  # the demo: its base (shipped or built) and questions
        args.model = args.model or str(demo.base(args.base_seed).resolve())
        examples = demo.questions("train")                       # train.py's training questions
    else:
        examples = data.load_medqa(common.from_hub(args.train_data, "data", "train", world))
    tokenizer = data.load_tokenizer(args.model)
    texts = [medqa_pair(ex) for ex in examples]
    if len(texts) < args.batch:
        raise ValueError(f"--train-data {args.train_data or 'demo'}: {len(texts)} examples, fewer than --batch {args.batch}: "
                         "not one optimizer step")
    pairs = data.tokenize_pairs(tokenizer, texts, args.max_len)
    run = checkpoint.RunFolder(args, rank, world, start)     # --out is ours (refused if it holds a model or a run)
    try:
        policy = M.load_model(args.model, device=device, dtype=torch.float32)   # fp32 master weights (common.shard)
        policy.model.gradient_checkpointing = args.grad_checkpoint
        policy = common.shard(policy.train(), world, common.compute_dtype(args.precision, device), args.offload)
        trained = {"policy": (policy, make_optimizer(policy, args.lr, args.weight_decay))}
        if ckpt:                                                 # resuming: weights, AdamW, after epoch `start`
            checkpoint.restore(ckpt, trained, rank)
        run.begin(args, world, files=("metrics.jsonl",), stop_signals=False)   # --overwrite: the old model goes

        def after_epoch(epoch, questions, response_tokens):  # a row: what it has trained on, then held-out results
            if held:
                row = evaluate.held_out_row(policy, tokenizer, held, samples=args.eval_samples, batch=args.eval_batch,
                                            max_new_tokens=args.max_new_tokens, rank=rank, world=world)
                run.write("metrics.jsonl", {"epoch": epoch, "questions": questions,
                                            "response_tokens": response_tokens, **row})      # eval_*, ood_*
                if rank == 0:
                    print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
            run.save(epoch, trained, tokenizer, args)            # after the row: a resumed run keeps it

        train(policy, pairs, epochs=args.epochs, batch=args.batch, micro_batch=args.micro_batch, lr=args.lr,
              warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
              rank=rank, world=world, device=device, after_epoch=after_epoch, opt=trained["policy"][1],
              start_epoch=start)
        run.close()                                          # the lock goes before the folder is swapped in whole
        common.export(policy, tokenizer, args.out, rank, world)
        if rank == 0:
            print(f"saved {args.out}")
    finally:
        run.close()


if __name__ == "__main__":
    common.cli(main)
