"""
The memory plan: what a configuration of train.py needs, per GPU and in host memory, computed from config.json and
the flags before any weight is read.

    plan, host_gb = memory.memory_plan(config, args, world, offload)   # GB by part, and GB of host memory a node
    memory.check_fits(config, args, world, gpu_gb)                     # refuses, saying what would fit
    print(memory.plan_table(args))                                     # train.py --plan: 1-8 GPUs, --offload or not

It sizes what common.py's FSDP2 layer and train.py allocate: the trained models' fp32 weights, gradients and AdamW
moments sharded over the ranks (or in host memory with --offload), the reference, and the largest phase of a step
(rollout, update, optimizer step). A plan, not a measurement: a test compares it with a real CPU step's memory.
"""
import os

import common
import model as M


def _block_params(config) -> int:
    """One decoder block's parameters: norms, q, k+v, o, mlp, biases."""
    H, I = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    return 2 * H + H * H + 2 * H * kv + H * H + 3 * H * I + H + 2 * kv


def _policy_params(config) -> int:
    """The policy's parameter count, from its config (transformers' count: tested)."""
    H, V = config.hidden_size, config.vocab_size
    return config.num_hidden_layers * _block_params(config) + V * H * (1 if config.tie_word_embeddings else 2) + H


def is_sft(args) -> bool:
    """Flags of sft.py (the policy alone, no reference; its --max-len sequences), not of train.py."""
    return not hasattr(args, "rollout_batch")


def memory_plan(config, args, world: int, offload: bool) -> tuple[dict, float]:
    """Estimated GB per GPU, by part, and GB of host memory per node (a plan, not a measurement) for train.py's flags
    `args` (or sft.py's: is_sft): fp32 master weights, compute in bf16 (or fp32 with --precision fp32: b bytes a
    value). Sharded over the ranks: actor (and, for gae, critic) weights + gradients + AdamW's two moments in fp32, 16 bytes a parameter, on
    the GPU or, with --offload, in host memory; the reference, b. Then the largest of three phases: the rollout or an
    evaluation (the actor's full weights + the KV cache of the sequences decoded together, --rollout-chunk or
    --eval-batch, + one block's temporaries over their prompts in the prefill) and the update (one micro-batch's
    activations: with --grad-checkpoint each block's input, else ~17 hidden-sized values a token per block; plus two
    gathered blocks, the LM head's chunks and its fp32 weight gradient and temporary) and the optimizer step (AdamW's
    fp32 temporary; in host memory with --offload). The allocator's fragmentation is the 10% check_fits leaves."""
    L, H, I, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    block, n = _block_params(config), _policy_params(config)
    sft = is_sft(args)
    prompt = args.max_len if sft else args.max_prompt_len
    gb, seq, b = 1e9, prompt + args.max_new_tokens, 4 if args.precision == "fp32" else 2
    gae = getattr(args, "advantage", None) == "gae"
    trained = {("policy" if sft else "actor") + " (fp32 weights, grads, AdamW)": 16 * n / world / gb}
    n_critic = n - (0 if config.tie_word_embeddings else V * H) + H           # no LM head; a value head
    if gae:
        trained["critic (fp32 weights, grads, AdamW)"] = 16 * n_critic / world / gb
    plan = {} if offload else dict(trained)
    if sft:
        decoding = args.eval_batch                                             # held-out questions decoded together
    else:
        plan["reference"] = b * n / world / gb
        per_rank = args.rollout_batch * args.samples_per_prompt // world
        decoding = max(min(per_rank, args.rollout_chunk or per_rank), args.eval_batch)
    prefill = decoding * prompt * (3 * I + 4 * H) * b                          # one block's temporaries over prompts
    rollout = b * n + L * 2 * kv * b * decoding * seq + prefill                 # full weights + K and V + prefill
    tokens = args.micro_batch * (args.max_len if sft else seq)
    acts = tokens * H * b * L if args.grad_checkpoint else tokens * 17 * b * H * L
    head = 3 * min(M.HEAD_CHUNK_BYTES, tokens * V * 4) + 2 * 4 * V * H        # a chunk's fp32 logits; weight grads
    update = acts + tokens * (2 * H + 3 * I) * b + 2 * block * b + head        # + one block's temporaries, two blocks
    # AdamW's step (foreach, as torch runs it on a GPU) makes one fp32 temporary the size of the model's shard,
    # sqrt(v), for the actor's step, then for the critic's: on the GPU, or with --offload in host memory
    step = 4 * max(n, n_critic if gae else 0) / world
    phases = {("held-out decoding" if sft else "rollout") + " (full weights, KV cache)": rollout,
              "update (activations)": update}
    if not offload:
        phases["optimizer step (AdamW's temporary)"] = step
    name = max(phases, key=phases.get)
    plan[name] = phases[name] / gb
    host = (sum(trained.values()) + step / gb) * min(world, 8) if offload else 0.0  # a node's (<= 8) ranks' shards
    return plan, host


def check_fits(config, args, world: int, capacity_gb: float, host_gb: float | None = None):
    """Refuse, with the numbers, a configuration whose plan exceeds 90% of the GPU's memory (or, offloading, of the
    host's), saying what would fit: --offload, more GPUs, or smaller batches."""
    def fits(w, offload):
        plan, host = memory_plan(config, args, w, offload)
        return sum(plan.values()) <= 0.9 * capacity_gb, plan, host
    host_gb = host_gb or host_memory_gb()
    ok, plan, host = fits(world, args.offload)
    if host > 0.9 * host_gb:
        raise ValueError(f"--offload needs about {host:.0f} GB of host memory a node, this one has {host_gb:.0f} GB: "
                         "use more nodes or GPUs' memory instead")
    if ok:
        return
    fixes = []
    offload_ok, _, offload_host = fits(world, True)
    if not args.offload and offload_ok:
        fixes.append(f"--offload (then ~{offload_host:.0f} GB of host memory a node)")
    more = next((w for w in (2, 4, 8, 16, 32, 64) if w > world and fits(w, args.offload)[0]), None)
    if more:
        fixes.append(f"{more} GPUs (now {world})")
    fixes.append("--grad-checkpoint, a smaller --micro-batch or --rollout-chunk, or shorter --max-new-tokens"
                 if not is_sft(args) else "--grad-checkpoint, a smaller --micro-batch or --eval-batch")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in plan.items())
    raise ValueError(f"this configuration needs about {sum(plan.values()):.0f} GB per GPU ({parts}) but a GPU "
                     f"has {capacity_gb:.0f} GB: use " + "; or ".join(fixes))


# the flags that size memory, which --plan prints as it resolved them: train.py's, sft.py's
SIZING_FLAGS = ("advantage", "rollout_batch", "samples_per_prompt", "rollout_chunk", "eval_batch", "micro_batch",
                "max_prompt_len", "max_new_tokens", "grad_checkpoint", "precision")
SFT_SIZING_FLAGS = ("micro_batch", "max_len", "eval_batch", "max_new_tokens", "grad_checkpoint", "precision")


def host_memory_gb() -> float:
    """This machine's RAM, as check_fits counts it."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def plan_table(args, gpus: tuple[int, float] | None = None) -> str:
    """train.py --plan (and sft.py's): per-GPU and host memory of --model (its config.json alone, also from a hub
    id) for 1, 2, 4 and 8 GPUs, with and without --offload, against GPUs of 24 / 48 / 80 / 141 GB (a plan fits in 90% of a GPU), as
    a markdown table; before it the flags as resolved (a 3B-class model without --preset is warned about), after
    it the command for this machine: `gpus` (count, GB each; default: torch's view of this machine)."""
    if args.model is None:
        raise ValueError("--plan needs --model (a checkpoint folder or a hub id; only its config.json is read)")
    config = M.Qwen2Config.from_json(common.from_hub(args.model, "config"))
    script = "sft.py" if is_sft(args) else "train.py"
    n_params = _policy_params(config)
    sizes, ram = (24, 48, 80, 141), host_memory_gb()
    lines = [f"memory plan of {args.model} ({n_params / 1e9:.1f}B parameters) under these flags (GB; per GPU, and "
             "host memory a node)",
             "flags: " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}"
                                  for k in (SIZING_FLAGS if script == "train.py" else SFT_SIZING_FLAGS)),
             "assumes: fp32 master weights, gradients and AdamW moments (16 B a parameter, sharded), "
             + ("a bf16 reference, " if script == "train.py" else "")
             + "and the largest of the rollout or held-out decoding (full weights, KV cache), the update "
             "(activations, LM head chunks) and AdamW's step (an fp32 temporary of a shard); a plan fits in 90% of a "
             "GPU (10% for fragmentation)"]
    if n_params > 1e9 and script == "train.py" and not args.preset:
        lines.append("warning: a billion-parameter model without --preset: these are the CPU demo's flags; the "
                     "paper's recipe is --preset med-rlvr")
    lines += ["", "| GPUs | --offload | per GPU | host | " + " | ".join(f"{s} GB" for s in sizes)
              + f" | host RAM here ({ram:.0f} GB) |", "|---|---|---|---|" + "---|" * (len(sizes) + 1)]
    for world in (1, 2, 4, 8):
        for offload in (False, True):
            plan, host = memory_plan(config, args, world, offload)
            gpu = sum(plan.values())
            lines.append(f"| {world} | {'yes' if offload else 'no'} | {gpu:.1f} | {host:.0f} | "
                         + " | ".join("fits" if gpu <= 0.9 * s else "-" for s in sizes)
                         + f" | {'ok' if host <= 0.9 * ram else 'too little'} |")
    if gpus is None:
        import torch
        gpus = (torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / 1e9) \
            if torch.cuda.is_available() else (0, 0.0)
    n, capacity = gpus
    plans = {offload: memory_plan(config, args, n, offload) for offload in (False, True)} if n else {}
    fitting = [offload for offload, (plan, host) in plans.items()
               if sum(plan.values()) <= 0.9 * capacity and host <= 0.9 * ram]
    if not n:
        lines += ["", "this machine: no GPU (the plan above is for GPUs)"]
    elif not fitting:
        lines += ["", f"this machine: {n} x {capacity:.0f} GB GPUs; these flags do not fit them (see the table)"]
    else:
        lines += ["", f"this machine: {n} x {capacity:.0f} GB GPUs; run:",
                  f"torchrun --standalone --nproc_per_node={n} {script}"
                  + (f" --preset {args.preset}" if getattr(args, "preset", None) else "") + f" --model {args.model}"
                  + (" --offload" if fitting[0] else "") + " ..."]
    return "\n".join(lines)
