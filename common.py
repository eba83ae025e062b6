"""
What every script shares: the torchrun / FSDP2 layer and the command line.

    rank, world, device = common.init_distributed()     # torchrun, or a world of one under plain `python`
    model = common.shard(model, world)                  # FSDP2, one unit per decoder block
    with common.full_weights(model): ...                # gathered once for a whole rollout, freed after
    state = common.full_state_dict(model, world)        # the whole model on rank 0's CPU, for saving
    common.export(model, tokenizer, out, rank, world)   # the HF folder transformers loads
    total = common.all_sum(x, world)                    # a float summed over the ranks
    common.cli(main)                                    # one-line errors for user mistakes, a clean exit

Sharding. Each decoder block is one FSDP2 unit (gathered just before it runs and freed after), embeddings, final
norm and head the root unit. On CUDA the stored weights keep their dtype (fp32 for the trained models) while
forward and backward compute in bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy): at PPO's
learning rate of 1e-6 an update is far below bf16's resolution (~4e-3 relative), so bf16 master weights would
never move. On a CPU everything is fp32 and a world of one keeps the plain module, unless --precision bf16
asks for the GPU's configuration there (to test its code paths: bf16 matmuls are slow on a CPU).

Losses over ranks. FSDP averages gradients over the ranks, so a trainer that wants the mean over the *global*
batch divides each rank's sum by the global count (all_sum) and multiplies by the world size. Then N processes
make exactly the update one process makes (tested).

The command line. Every script declares its flags with plain argparse at the top of the file, through
`parser()`, whose help shows each flag's default; the typed checks below reject a bad value with a one-line
message that names the flag, before any work starts.
"""
import argparse
import datetime
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

import model as M


# ------------------------------------------------------------------------------------------------ processes
# How long a rank waits in a collective (a barrier) for the others: rank 0 alone gathers and writes the final HF
# export (3B in fp32: ~12 GB) while the others wait, which can outlast NCCL's default of 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


_USERS = 0      # init_distributed calls not yet finish()ed: the last finish() leaves the process group
_OWN_ENV = {}   # the torchrun variables a one-process group set (finish() removes them)


def init_distributed(group: bool = False):
    """-> (rank, world, device). torchrun sets RANK / WORLD_SIZE; plain `python` runs as a world of one (on a GPU, or
    on a CPU with group=True - --precision bf16, --offload - as a one-process group, so that FSDP2 applies there too).
    Called again in a process that has a group (bench.py runs train.main several times), it joins that group."""
    global _USERS
    _USERS += 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), \
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if "RANK" not in os.environ:
        if not torch.cuda.is_available() and not group:
            return 0, 1, torch.device("cpu")
        import socket
        with socket.socket() as s:                  # a free port for the one-process group
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        _OWN_ENV.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))
        os.environ.update(_OWN_ENV)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        M.attention_kernels(device)                 # no cuDNN attention (model.py says why)
        # nccl for the model's tensors, gloo for the few CPU scalars that all_sum reduces
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def _all_reduce(x: float, world: int, op) -> float:
    """x reduced over all ranks (float64 on the CPU: exact for counts, and gloo reduces it beside nccl)."""
    if world == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def all_sum(x: float, world: int) -> float:
    return _all_reduce(x, world, dist.ReduceOp.SUM)


def all_max(x: float, world: int) -> float:
    return _all_reduce(x, world, dist.ReduceOp.MAX)


def gather(items: list, world: int) -> list:
    """Every rank's list of picklable items, concatenated in rank order, on every rank."""
    if world == 1:
        return items
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier(world: int):
    if world > 1:
        dist.barrier()


def agree(message: str | None, world: int) -> None:
    """Raise ValueError(message) on every rank when rank 0 found a problem (rank 0 checked alone; the others
    must not wait forever in the next collective)."""
    if world > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise ValueError(message)


class StopSignal:
    """SIGTERM / SIGINT (a scheduler's preemption notice, Ctrl-C) set a flag instead of killing the process; the
    trainer checks `requested(world)` between steps, and all ranks stop when any rank got a signal. A second
    signal stops at once, the usual way."""

    def __init__(self):
        self.got = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig, frame):
        self.got = sig
        signal.signal(sig, signal.SIG_DFL)          # the second one is not caught
        # os.write, not print: the handler may run in the middle of a print to stderr (tqdm's), which would raise
        os.write(2, f"\n{signal.Signals(sig).name}: finishing this step, then writing a checkpoint "
                    "(send it again to stop at once)\n".encode())

    def requested(self, world: int) -> int:
        """The signal number any rank got (0: none)."""
        return int(all_max(self.got, world))


# ------------------------------------------------------------------------------------------------ run folders
def non_finite(state: dict) -> str | None:
    """The name of the first tensor of a state dict (nested dicts and lists too) holding a NaN or inf, or None."""
    def walk(x, name):
        if isinstance(x, torch.Tensor):
            x = x.to_local() if hasattr(x, "to_local") else x    # a DTensor: this rank's shard
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                return name
        elif isinstance(x, dict):
            for k, v in x.items():
                if (bad := walk(v, f"{name}.{k}" if name else str(k))) is not None:
                    return bad
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                if (bad := walk(v, f"{name}[{i}]")) is not None:
                    return bad
        return None
    return walk(state, "")


def check_checkpoint(path):
    """A checkpoint folder is usable, checked without reading a weight: config.json, every safetensors file whole
    (their headers), tokenizer.json, and a vocabulary that covers the tokenizer's. Raises naming the file."""
    import data
    config = M.Qwen2Config.from_json(path)
    M.read_safetensors(path, "cpu", headers_only=True)
    n_tokens = data.load_tokenizer(path).get_vocab_size()
    if config.vocab_size < n_tokens:
        raise ValueError(f"{path}: tokenizer.json has {n_tokens} tokens but the model's vocabulary has "
                         f"{config.vocab_size}")


def truncate_jsonl(path: Path, last_step: int, log=print):
    """Keep the rows up to the checkpoint's step: the resumed run redoes the later ones, identically. (An
    evaluation row at that step was the end of the interrupted run, not a part of the whole one.) A torn last
    line (a kill mid-write) is dropped; a bad line elsewhere is an error naming it."""
    if not path.exists():
        return
    lines, rows = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log(f"{path} line {i + 1}: torn by the interruption, dropped")
                continue
            raise ValueError(f"{path} line {i + 1}: not JSON; repair or delete the line, then resume") from None
        if row["step"] < last_step or (row["step"] == last_step and "eval_accuracy" not in row):
            rows.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)                                        # never a half-written metrics file


def claim_out(out: Path, resume: bool, overwrite: bool, start: int, rank: int, world: int):
    """Before anything is written: refuse an --out that holds another run (unless --resume continues it or
    --overwrite deletes it), and lock it against a second run. -> the lock file (rank 0) or None."""
    message, held_lock = None, None
    if rank == 0:
        held = [f for f in ("metrics.jsonl", "checkpoint", "checkpoint.old", "final") if (out / f).exists()]
        if held and not overwrite and not resume:
            message = (f"--out {out} holds a run ({', '.join(held)}): add --resume to continue it, --overwrite to "
                       "delete it and start over, or choose another --out")
        elif held and not overwrite and start == 0:
            message = (f"--resume: {out} holds a run ({', '.join(held)}) but no checkpoint to continue from; "
                       "add --overwrite to delete it and start over")
        else:
            try:
                held_lock = lock(out)
            except (ValueError, OSError) as e:                   # in use; or not writable
                message = str(e)
    agree(message, world)
    return held_lock


def lock(out: Path):
    """Hold an exclusive lock on <out>/.lock for the rest of the run, or raise naming the process that holds it.
    The kernel releases the lock when its process ends, however it ends (a crash, a SIGKILL): no stale locks.
    -> the open lock file; unlock() releases it."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"--out {out} is in use by another run ({holder}); wait for it or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


def unlock(f):
    if f is not None:
        f.close()                                # closing the file releases the lock; the file itself stays


# ------------------------------------------------------------------------------------------------ trackers
def check_trackers(wandb_project: str | None, tensorboard_dir: str | None):
    """--wandb / --tensorboard: their package is there, and W&B can log in or runs offline (checked before any
    work; each package imported only when asked)."""
    import importlib.util
    for flag, package, asked in (("--wandb", "wandb", wandb_project), ("--tensorboard", "tensorboard", tensorboard_dir)):
        if asked and importlib.util.find_spec(package) is None:
            raise ImportError(f"{flag} needs the {package} package: pip install {package}")
    netrc = Path.home() / ".netrc"
    if wandb_project and os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun") and \
            not os.environ.get("WANDB_API_KEY") and not (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
        raise ValueError("--wandb: no W&B API key (run `wandb login` or set WANDB_API_KEY), or set WANDB_MODE=offline "
                         "to log locally")


def trackers(wandb_project: str | None, tensorboard_dir: str | None, config: dict, rank: int):
    """-> track(file, row): what train.py writes to metrics.jsonl (every number, at its step) and, for wandb, to
    samples.jsonl (a table of a sampled step's responses) sent on to Weights & Biases and / or TensorBoard, from rank
    0; track(None, None) closes them. Optional: training needs neither, so neither is a dependency."""
    if rank != 0 or not (wandb_project or tensorboard_dir):
        return lambda file, row: None
    board = run = None
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        board = SummaryWriter(tensorboard_dir)
    if wandb_project:
        import wandb
        try:
            run = wandb.init(project=wandb_project, config=config)
        except Exception as e:                                   # (its errors are not all ValueErrors)
            raise ValueError(f"--wandb {wandb_project}: {e}") from None
    samples = []

    def track(file, row):
        if samples and file != "samples.jsonl":            # a sampled step's responses are all in: one table
            data = [[json.dumps(v) if isinstance(v, dict) else v for v in r.values()] for r in samples]
            run.log({"samples": wandb.Table(columns=list(samples[0]), data=data)}, step=samples[0]["step"])
            samples.clear()
        if file == "samples.jsonl" and run:
            samples.append(row)
        elif file == "metrics.jsonl":
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}   # not null
            if board:
                for k, v in numbers.items():
                    board.add_scalar(k, v, row["step"])
                board.flush()                                    # on disk now: a kill loses no row
            if run:
                run.log(numbers, step=row["step"])
        elif file is None:
            if board:
                board.close()
            if run:
                run.finish()
    return track


# ------------------------------------------------------------------------------------------------ hub ids
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")       # org/name, or org/name:split for data
FILE_SUFFIX = re.compile(r"\.(jsonl|json|parquet|csv|txt|safetensors)$")    # a missing file, not an id
MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"]


def from_hub(arg: str | None, kind: str, split: str | None = None, world: int = 1) -> str | None:
    """A path as it is; a Hugging Face id (not an existing path, and `org/name`, or `org/name:split` for data) -> the
    local path of its files in the HF cache: kind "model" a checkpoint folder (config, safetensors, tokenizer only),
    kind "config" the folder with config.json alone, kind "data" the one file of its split (`split` unless the id
    names one: the file whose name holds it). The cache comes first: an id whose files are cached is used as it is,
    without asking the network (a machine with none does not wait for it; delete the cached copy to fetch a newer
    one). Otherwise it is fetched once, by local rank 0 of each node under a file lock while the other ranks wait;
    then every rank reads the cache. HF_HOME and HF_HUB_OFFLINE work as everywhere; an id that is neither cached
    nor reachable is one error line."""
    if arg is None or Path(arg).exists() or not HUB_ID.fullmatch(arg) or FILE_SUFFIX.search(arg) or \
            Path(arg.split("/")[0]).is_dir():    # runs/sft: a local path (reported, by name, where it is read)
        return arg
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
    except ImportError:
        raise ImportError(f"{arg}: reading a Hugging Face id needs huggingface_hub (pip install huggingface_hub), "
                          "or give a local path") from None
    repo, _, named = arg.partition(":")
    split = named or split
    patterns = {"model": MODEL_FILES, "config": ["config.json"]}.get(kind) or \
        [f"*{split}*.{ext}" for ext in ("jsonl", "json", "parquet")]
    repo_type = "dataset" if kind == "data" else "model"

    def get(cached_only):
        return hub.snapshot_download(repo, repo_type=repo_type, allow_patterns=patterns, local_files_only=cached_only)

    def cached() -> bool:                                   # every file pattern this kind needs, in the cache
        try:
            names = {f.name for f in Path(get(cached_only=True)).rglob("*") if f.is_file()}
        except Exception:
            return False
        # a model needs each of its files (a sharded one's index aside); a data split any one of its patterns
        groups = [patterns] if kind == "data" else [[p] for p in patterns if p != "model.safetensors.index.json"]
        return all(any(fnmatch.fnmatch(n, p) for n in names for p in group) for group in groups)
    fetch_error = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not cached():
        import fcntl
        Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)
        with open(Path(constants.HF_HUB_CACHE) / ".med-rlvr.lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)           # one download at a time, also across runs
            try:
                get(cached_only=False)
            except Exception as e:                          # every rank reports it below, from the cache
                fetch_error = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else \
                    (str(e).strip().splitlines() or [type(e).__name__])[0]
    barrier(world)
    try:
        folder = Path(get(cached_only=True))
    except Exception:
        hint = " --repo-type dataset" if kind == "data" else ""
        raise ValueError(f"{arg}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and not fetched "
                         f"({fetch_error or 'another rank fetches it'}); run once with network access (HF_HUB_OFFLINE "
                         f"unset), `hf download {repo}{hint}`, or give a local path") from None
    if kind != "data":
        return str(folder)
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()
                   and any(fnmatch.fnmatch(f.name, p) for p in patterns))
    if len(files) != 1:
        raise ValueError(f"{arg}: {'no' if not files else len(files)} files for split {split!r} in {repo} "
                         f"({', '.join(files) or 'none'}" + (f"; cached, not fetched: {fetch_error}" if fetch_error
                                                             else "") + "); name the split (org/name:split) or give a "
                         "local path")
    return str(folder / files[0])


# ------------------------------------------------------------------------------------------------ FSDP2
PRECISION_HELP = ("auto: bf16 compute with fp32 master weights on CUDA, fp32 on a CPU; bf16: that GPU configuration "
                  "anywhere (slow on a CPU: to test the GPU's code paths); fp32: fp32 throughout")


def compute_dtype(precision: str, device) -> torch.dtype:
    """The dtype that forward and backward compute in under --precision (PRECISION_HELP)."""
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def shard(model, world: int, dtype: torch.dtype | None = None, offload: bool = False):
    """FSDP2 per decoder block (see the module docstring), computing in `dtype` (default: bf16 on CUDA, fp32 on a
    CPU) while the stored weights keep theirs; an fp32 world of one on a CPU keeps the plain module. offload: the
    sharded weights, their gradients and so the optimizer's state live in host memory, and the optimizer steps
    there (FSDP2's CPUOffloadPolicy; each block's weights visit the GPU for its forward and backward)."""
    device = next(model.parameters()).device
    dtype = dtype or compute_dtype("auto", device)
    if world == 1 and device.type != "cuda" and dtype == torch.float32 and not offload:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy())
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


# ------------------------------------------------------------------------------------------------ memory plan
def memory_plan(config, args, world: int, offload: bool) -> tuple[dict, float]:
    """Estimated GB per GPU, by part, and GB of host memory per node (a plan, not a measurement) for train.py's flags
    `args`: fp32 master weights, compute in bf16 (or fp32 with --precision fp32: b bytes a value). Sharded over the
    ranks: actor (and, for gae, critic) weights + gradients + AdamW's two moments in fp32, 16 bytes a parameter, on
    the GPU or, with --offload, in host memory; the reference, b. Then the larger of the two phases: the rollout or an
    evaluation (the actor's full weights + the KV cache of the sequences decoded together, --rollout-chunk or
    --eval-batch, + one block's temporaries over their prompts in the prefill) and the update (one micro-batch's
    activations: with --grad-checkpoint each block's input, else ~17 hidden-sized values a token per block; plus two
    gathered blocks, the LM head's chunks and its fp32 weight gradient and temporary) and the optimizer step (AdamW's
    fp32 temporary; in host memory with --offload). The allocator's fragmentation is the 10% check_fits leaves."""
    L, H, I, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    block = 2 * H + H * H + 2 * H * kv + H * H + 3 * H * I + H + 2 * kv     # norms, q, k+v, o, mlp, biases
    n = L * block + V * H * (1 if config.tie_word_embeddings else 2) + H
    gb, seq, b = 1e9, args.max_prompt_len + args.max_new_tokens, 4 if args.precision == "fp32" else 2
    per_rank = args.rollout_batch * args.samples_per_prompt // world
    trained = {"actor (fp32 weights, grads, AdamW)": 16 * n / world / gb}
    n_critic = n - (0 if config.tie_word_embeddings else V * H) + H           # no LM head; a value head
    if args.advantage == "gae":
        trained["critic (fp32 weights, grads, AdamW)"] = 16 * n_critic / world / gb
    plan = {} if offload else dict(trained)
    plan["reference"] = b * n / world / gb
    decoding = max(min(per_rank, args.rollout_chunk or per_rank), args.eval_batch)   # sequences decoded together
    prefill = decoding * args.max_prompt_len * (3 * I + 4 * H) * b              # one block's temporaries over prompts
    rollout = b * n + L * 2 * kv * b * decoding * seq + prefill                 # full weights + K and V + prefill
    tokens = args.micro_batch * seq
    acts = tokens * H * b * L if args.grad_checkpoint else tokens * 17 * b * H * L
    head = 3 * min(M.HEAD_CHUNK_BYTES, tokens * V * 4) + 2 * 4 * V * H        # a chunk's fp32 logits; weight grads
    update = acts + tokens * (2 * H + 3 * I) * b + 2 * block * b + head        # + one block's temporaries, two blocks
    # AdamW's step (foreach, as torch runs it on a GPU) makes one fp32 temporary the size of the model's shard,
    # sqrt(v), for the actor's step, then for the critic's: on the GPU, or with --offload in host memory
    step = 4 * max(n, n_critic if args.advantage == "gae" else 0) / world
    phases = {"rollout (full weights, KV cache)": rollout, "update (activations)": update}
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
    host_gb = host_gb or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9     # this machine's RAM
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
    fixes.append("--grad-checkpoint, a smaller --micro-batch or --rollout-chunk, or shorter --max-new-tokens")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in plan.items())
    raise ValueError(f"this configuration needs about {sum(plan.values()):.0f} GB per GPU ({parts}) but a GPU "
                     f"has {capacity_gb:.0f} GB: use " + "; or ".join(fixes))


def plan_table(args) -> str:
    """train.py --plan: per-GPU and host memory of --model (its config.json alone, also from a hub id) for 1, 2, 4
    and 8 GPUs, with and without --offload, against GPUs of 24 / 48 / 80 / 141 GB (a plan fits in 90% of a GPU), as
    a markdown table."""
    if args.model is None:
        raise ValueError("--plan needs --model (a checkpoint folder or a hub id; only its config.json is read)")
    config = M.Qwen2Config.from_json(from_hub(args.model, "config"))
    sizes = (24, 48, 80, 141)
    lines = [f"memory plan of {args.model} under these flags (GB; per GPU, and host memory a node)",
             "assumes: fp32 master weights, gradients and AdamW moments (16 B a parameter, sharded), a bf16 reference, "
             "and the largest of the rollout (full weights, KV cache), the update (activations, LM head chunks) "
             "and AdamW's step (an fp32 temporary of a shard); a plan fits in 90% of a GPU (10% for fragmentation)",
             "",
             "| GPUs | --offload | per GPU | host | " + " | ".join(f"{s} GB" for s in sizes) + " |",
             "|---|---|---|---|" + "---|" * len(sizes)]
    for world in (1, 2, 4, 8):
        for offload in (False, True):
            plan, host = memory_plan(config, args, world, offload)
            gpu = sum(plan.values())
            lines.append(f"| {world} | {'yes' if offload else 'no'} | {gpu:.1f} | {host:.0f} | "
                         + " | ".join("fits" if gpu <= 0.9 * s else "-" for s in sizes) + " |")
    return "\n".join(lines)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextmanager
def full_weights(model):
    """The rollout's gather: every FSDP unit's full weights gathered once (in the compute dtype: bf16 on CUDA),
    yielded as a plain module of the same class that shares them: decoding runs none of FSDP's per-module hooks
    and no communication, so the ranks may decode different numbers of tokens. Freed after. A plain module is
    yielded as it is."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()                              # the modules now hold the full (unsharded) parameters
    try:
        cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))   # fully_shard subclassed it
        with torch.device("meta"):
            plain = cls(model.config)
        state = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
        plain.load_state_dict(state, strict=True, assign=True)
        if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "lm_head"):
            plain.lm_head.weight = plain.model.embed_tokens.weight
        yield plain.eval()
    finally:
        for u in units:
            u.reshard()


def full_state_dict(model, world: int) -> dict:
    """The whole model's weights on rank 0's CPU (other ranks get an empty dict under FSDP)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export(model, tokenizer, out, rank: int, world: int, dtype: str = "float32"):
    """The trained policy in HF layout (config.json + model.safetensors + tokenizer.json), which transformers
    loads: gathered to rank 0, cast to `dtype` ("bfloat16": half the size, as Qwen2.5 is released), written to
    <out>.tmp, then renamed over <out>."""
    state = {k: v.to(getattr(torch, dtype)) for k, v in full_state_dict(model, world).items()}
    bad = non_finite(state) if rank == 0 else None
    agree(bad and f"refusing to write {out}: tensor {bad} is not finite (NaN or inf)", world)
    if rank == 0:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        M.save_model(model, tmp, state_dict=state)
        tokenizer.save(str(tmp / "tokenizer.json"))
        for f in ("args.json", "metrics.jsonl"):                 # sft.py's records beside its model are kept
            if (out / f).is_file():
                os.replace(out / f, tmp / f)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier(world)


SKIP_LIMIT = 3   # optimizer steps skipped in a row for a non-finite gradient before a trainer gives up


def clip_and_step(nets_and_opts, grad_clip: float) -> bool:
    """Clip each model's gradient norm and step its optimizer, unless some norm is NaN or inf (a diverging loss):
    then nothing steps and the gradients are dropped, so no NaN ever reaches the weights. Returns whether it
    stepped. Under FSDP the norm covers all ranks, so all ranks decide alike."""
    norms = [torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip) for net, _ in nets_and_opts]
    ok = all(bool(torch.isfinite(n.full_tensor() if hasattr(n, "full_tensor") else n)) for n in norms)
    for _, opt in nets_and_opts:
        if ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return ok


def save_checkpoint(out: Path, models: dict, state: dict, tokenizer, rank: int, world: int):
    """<out>/checkpoint: weights/ (every model's weights and optimizer state, torch.distributed.checkpoint: each
    rank writes its own shard, nothing is gathered), rng_rank*.pt (each rank's RNG), state.json (`state`),
    tokenizer.json. models: name -> (model, optimizer). Written to checkpoint.tmp, checked to be finite, then
    swapped in by two renames, so a kill at any moment leaves the previous checkpoint (or, between the renames,
    checkpoint.old) whole. (The final policy is exported in HF layout separately: export.)"""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    shards = _shards(models)
    bad = non_finite(shards)                                     # this rank's shards; any rank's stops all
    if all_sum(bad is not None, world):
        raise ValueError(f"refusing to write a checkpoint at step {state.get('step')}: "
                         f"{bad or 'a tensor on another rank'} is not finite; {final} is untouched")
    _dcp("save", shards, tmp / "weights")                         # each rank writes its own shard
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0)},
               tmp / f"rng_rank{rank}.pt")
    barrier(world)                                               # every rank's files are in before the rename
    if rank == 0:
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():                                       # (else: resumed from a lone checkpoint.old, kept
            shutil.rmtree(old, ignore_errors=True)               # until the new one is in place)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(world)


def restore_checkpoint(ckpt: Path, models: dict, rank: int):
    """Load save_checkpoint's weights and optimizer states into the models (name -> (model, optimizer), built as
    for a fresh run: each rank reads its own shard) and this rank's RNG state."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    if not (ckpt / "weights").is_dir():
        raise ValueError(f"{ckpt}: no weights/ (a checkpoint of an older version of this code?); it cannot be "
                         "resumed by this one")
    shards = _shards(models)
    _dcp("load", shards, ckpt / "weights")                        # in place, each rank its own shard
    for name, (net, opt) in models.items():
        set_state_dict(net, opt, model_state_dict=shards[name]["model"], optim_state_dict=shards[name]["optim"])
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"])


def _shards(models: dict) -> dict:
    """name -> {"model", "optim"}: each model's and optimizer's state dicts as this rank holds them (shards under
    FSDP, the optimizer's state created if it has not stepped yet)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return {name: dict(zip(("model", "optim"), get_state_dict(net, opt))) for name, (net, opt) in models.items()}


def _dcp(verb: str, shards: dict, folder: Path):
    """torch.distributed.checkpoint's save or load, also in one process without a process group."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():                              # one process: DCP says so, at length
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        getattr(dcp, verb)(shards, checkpoint_id=folder, no_dist=not dist.is_initialized())


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps (the first at lr / warmup), then constant."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def cosine_lr(update: int, total: int, warmup: int, min_ratio: float) -> float:
    """OpenRLHF 0.5.9's schedule (transformers' cosine_with_min_lr), as a share of the lr at optimizer step `update`
    (from 0) of `total`: linear from 0 over the first `warmup` (the very first update runs at 0, as there), then half
    a cosine down to min_ratio."""
    if update < warmup:
        return update / max(1, warmup)
    progress = (update - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, factor * (1 - min_ratio) + min_ratio)


# ------------------------------------------------------------------------------------------------ command line
class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):         # a flag without a default says what None means in its help
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line that names the flag, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def renamed(parser: argparse.ArgumentParser, old: str, new: str):
    """`old`, a flag's former name, refused in one line that names `new` (hidden from --help)."""
    class Refuse(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            p.error(f"{old} is now {new} (as in train.py)")
    parser.add_argument(old, action=Refuse, help=argparse.SUPPRESS)


def parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows the script docstring's first paragraph and every flag's default, and
    whose errors are one line."""
    return _Parser(description=doc.strip().split("\n\n")[0], formatter_class=_ShowDefaults)


def _typed(cast, ok, what):
    def check(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {cast.__name__}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    check.__name__ = cast.__name__          # argparse names the type in its messages
    return check


positive_int = _typed(int, lambda v: v > 0, "> 0")
nonneg_int = _typed(int, lambda v: v >= 0, ">= 0")
nonneg_float = _typed(float, lambda v: v >= 0 and v != float("inf"), ">= 0 and finite")
positive_float = _typed(float, lambda v: 0 < v < float("inf"), "> 0 and finite")
unit_float = _typed(float, lambda v: 0 < v <= 1, "in (0, 1]")
prob_float = _typed(float, lambda v: 0 <= v <= 1, "in [0, 1]")
any_float = _typed(float, lambda v: abs(v) != float("inf") and v == v, "finite")


class Abort(Exception):
    """A run that stops on purpose (a signal, a diverging loss): exit with this message and code, no traceback."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def cli(main):
    """Run main(); a user mistake (a missing file or package, a bad checkpoint, flag or data row) or an Abort exits
    with its one-line message instead of a traceback from every rank."""
    code = 0
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except Abort as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = e.code
    if "RANK" in os.environ:
        # Under torchrun, a gloo thread now and then aborts the process during interpreter teardown ("terminate
        # called without an active exception"), after all is written: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def machine() -> dict:
    """What ran a run, for its args.json: the CPU's name, torch's version, the GPU's name (floating-point results
    differ from one CPU or GPU kind to another)."""
    import platform
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def peak_memory_mb(device) -> float:
    """Peak memory: CUDA memory allocated since the run began on a GPU (run() resets it: a process may run several),
    the process's peak resident set size (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux reports KiB


def finish(world: int):
    """The end of a script: leave the process group, unless a caller that joined it first still uses it."""
    global _USERS
    _USERS = max(0, _USERS - 1)
    if dist.is_initialized() and _USERS == 0:
        dist.destroy_process_group()
        for k in _OWN_ENV:
            os.environ.pop(k, None)
        _OWN_ENV.clear()
