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
never move. On CPU everything is fp32, and a world of one keeps the plain module.

Losses over ranks. FSDP averages gradients over the ranks, so a trainer that wants the mean over the *global*
batch divides each rank's sum by the global count (all_sum) and multiplies by the world size. Then N processes
make exactly the update one process makes (tested).

The command line. Every script declares its flags with plain argparse at the top of the file, through
`parser()`, whose help shows each flag's default; the typed checks below reject a bad value with a one-line
message that names the flag, before any work starts.
"""
import argparse
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


# ------------------------------------------------------------------------------------------------ processes
def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed():
    """-> (rank, world, device). torchrun sets RANK / WORLD_SIZE; plain `python` runs as a world of one (on a
    GPU as a one-process group, so that FSDP2's mixed precision applies there too)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), \
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if "RANK" not in os.environ:
        if not torch.cuda.is_available():
            return 0, 1, torch.device("cpu")
        import socket
        with socket.socket() as s:                  # a free port for the one-process group
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        # nccl for the model's tensors, gloo for the few CPU scalars that all_sum reduces
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(x: float, world: int) -> float:
    """x summed over all ranks (float64 on the CPU: exact for counts, and gloo reduces it beside nccl)."""
    if world == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def barrier(world: int):
    if world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ FSDP2
def shard(model, world: int):
    """FSDP2 per decoder block (see the module docstring); a CPU world of one keeps the plain module."""
    device = next(model.parameters()).device
    if world == 1 and device.type != "cuda":
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextmanager
def full_weights(model):
    """The rollout's gather: every FSDP unit's full weights gathered once (in the compute dtype: bf16 on CUDA)
    and kept until the block ends, then freed. No communication happens while decoding, so the ranks may
    decode different numbers of tokens. A plain module needs nothing."""
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


def full_state_dict(model, world: int) -> dict:
    """The whole model's weights on rank 0's CPU (other ranks get an empty dict under FSDP)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export(model, tokenizer, out, rank: int, world: int):
    """The trained policy in HF layout (config.json + model.safetensors + tokenizer.json), which transformers
    loads: gathered to rank 0, written to <out>.tmp, then renamed over <out>."""
    import model as M
    state = full_state_dict(model, world)
    if rank == 0:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        M.save_model(model, tmp, state_dict=state)
        tokenizer.save(str(tmp / "tokenizer.json"))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier(world)


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup, then constant. (OpenRLHF decays by cosine to 0.1 lr after warmup; one schedule less here.)"""
    return lr * min(1.0, (step + 1) / max(1, warmup))


# ------------------------------------------------------------------------------------------------ command line
class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):         # a flag without a default says what None means in its help
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line that names the flag, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def cli(main):
    """Run main(); a user mistake (a missing file, a bad checkpoint, flag or data row) exits with its one-line
    message instead of a traceback from every rank."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if "RANK" in os.environ:
        # Under torchrun, a gloo thread now and then aborts the process during interpreter teardown ("terminate
        # called without an active exception"), after all is written: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def finish(world: int):
    """The end of a script: leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()
