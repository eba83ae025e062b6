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
import math
import os
import re
import shutil
import sys
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


# ------------------------------------------------------------------------------------------------ inputs and outputs
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
        for f in ("args.json", "metrics.jsonl", "checkpoint"):   # sft.py's records beside its model are kept
            if (out / f).exists():
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
    """Peak memory: CUDA memory allocated since the run began on a GPU (train.main resets it: a process may run several),
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
