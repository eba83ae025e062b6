"""
A run's folder (--out) and everything written into it or read back from it: train.py's and sft.py's housekeeping,
so that their loops hold only the learning.

    ckpt, start = checkpoint.find(args, world, TRAJECTORY_FLAGS)  # --resume: the checkpoint and its step
    run = checkpoint.RunFolder(args, rank, world, start, log)   # claims --out: another run's folder is refused, locked
    run.begin(args, world)                # args.json; metrics.jsonl / samples.jsonl cut back to the checkpoint's step;
                                          # --wandb / --tensorboard; SIGTERM / SIGINT now mean "checkpoint, then stop"
    run.write("metrics.jsonl", row)       # one JSON line (NaN as null), also to the trackers
    run.save(step, models, tokenizer, args)           # <out>/checkpoint, swapped in whole
    run.stop_if_asked(step, saved, models, tokenizer, args)   # a signal: checkpoint (if not just saved) and exit
    run.steps_done()                      # past the steps: a signal stops at once again
    run.close()                           # trackers flushed, the lock released (also after an error)

The folder: args.json (the flags, the world size, the machine), metrics.jsonl (one row per step or epoch, and one
per evaluation), samples.jsonl (train.py: every response of a sampled step), checkpoint/ (sharded weights,
optimizer states, RNG, state.json; checkpoint.old while a new one is swapped in), final/ (the HF export). Nothing
already written is lost on a crash, a kill or a rerun: a second run is refused while one holds the lock, files
are written under a temporary name and renamed, and nothing non-finite is saved.
"""
import json
import math
import os
import shutil
import signal
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import common



# ------------------------------------------------------------------------------------------------ the run folder
class RunFolder:
    """One run's --out, from claim to close (see the module docstring). `start` is the step a resumed run continues
    from (0: a fresh run); only rank 0 writes files, every rank takes part in the collectives."""

    def __init__(self, args, rank: int, world: int, start: int = 0, log=print):
        self.out, self.rank, self.world, self.start, self.log = Path(args.out), rank, world, start, log
        self.lock = claim_out(self.out, args.resume, args.overwrite, start, rank, world)
        self.track, self.signals = (lambda file, row: None), None

    def begin(self, args, world: int, files=("metrics.jsonl", "samples.jsonl"), stop_signals: bool = True):
        """Called once the models are built (a failure before leaves the folder as it was): --overwrite deletes the
        old run's outputs, a resumed run cuts its files back to the checkpoint's step, a fresh one writes args.json.
        stop_signals: from now on SIGTERM / SIGINT wait for stop_if_asked (for a loop that calls it between steps)."""
        if self.rank == 0:
            if args.overwrite:                  # the old run's outputs (train.py's folders, sft.py's model) go
                for d in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "final"):
                    shutil.rmtree(self.out / d, ignore_errors=True)
                for f in ("config.json", "model.safetensors", "tokenizer.json", "args.json"):
                    (self.out / f).unlink(missing_ok=True)
            for f in files:
                (truncate_jsonl(self.out / f, self.start, self.log) if self.start
                 else (self.out / f).unlink(missing_ok=True))
            if not self.start:                                   # the run's flags, for readers of its metrics
                (self.out / "args.json").write_text(json.dumps({**vars(args), "world": world,
                                                                "machine": common.machine()}, indent=1))
        self.track = trackers(getattr(args, "wandb", None), getattr(args, "tensorboard", None), vars(args), self.rank)
        self.signals = StopSignal() if stop_signals else None

    def write(self, name: str, row: dict):
        """Append a row to <out>/<name> (rank 0; NaN / inf written as null: valid JSON) and send it to the trackers."""
        if self.rank == 0:
            row = {k: v if not isinstance(v, float) or math.isfinite(v) else None
                   for k, v in row.items()}
            with open(self.out / name, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.track(name, row)

    def save(self, step: int, models: dict, tokenizer, args):
        """<out>/checkpoint at `step`: the data position and every seed derive from the step."""
        save(self.out, models, {"step": step, "world": self.world, "args": vars(args)}, tokenizer, self.rank,
             self.world)

    def stop_if_asked(self, step: int, saved: bool, models: dict, tokenizer, args):
        """Between steps: when any rank got SIGTERM / SIGINT, all write a checkpoint (unless one was just written)
        and stop together with the signal's exit code; resuming continues from there."""
        sig = self.signals.requested(self.world)
        if sig:
            if not saved:
                self.save(step, models, tokenizer, args)
            raise common.Abort(f"{signal.Signals(sig).name} after step {step}: checkpoint written to "
                               f"{self.out / 'checkpoint'}; continue with the same command and --resume",
                               code=128 + sig)

    def steps_done(self):
        """Past the last step (the final evaluation and export): a signal stops the process at once again."""
        if self.signals:
            self.signals.restore()
            self.signals = None

    def close(self):
        """The trackers keep what they got, the signal handlers and the lock are released; safe after an error."""
        self.track(None, None)
        self.track = lambda file, row: None
        self.steps_done()
        unlock(self.lock)
        self.lock = None


# ------------------------------------------------------------------------------------------------ claiming --out
def claim_out(out: Path, resume: bool, overwrite: bool, start: int, rank: int, world: int):
    """Before anything is written: refuse an --out that holds another run (unless --resume continues it or
    --overwrite deletes it), and lock it against a second run. -> the lock file (rank 0) or None."""
    message, held_lock = None, None
    if rank == 0:
        held = [f for f in ("metrics.jsonl", "checkpoint", "checkpoint.old", "final", "config.json")   # (sft.py's
                if (out / f).exists()]                                                             # model)
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
    common.agree(message, world)
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
        # train.py's rows count steps: its evaluation row at the checkpoint's step ended the interrupted run (the
        # resumed one redoes it where the whole run has one); sft.py's count epochs, each saved after its row
        at = row["step"] if "step" in row else row["epoch"]
        if at < last_step or (at == last_step and ("epoch" in row or "eval_accuracy" not in row)):
            rows.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)                                        # never a half-written metrics file



# ------------------------------------------------------------------------------------------------ preemption
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
        return int(common.all_max(self.got, world))


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




# ------------------------------------------------------------------------------------------------ resuming
FLAGS_ADDED_LATER = {"whiten": True}    # flags newer than some checkpoints: the value those runs had


def find(args, world: int, trajectory_flags) -> tuple[Path | None, int]:
    """Resuming, part 1: -> (checkpoint folder, its step), or (None, 0) for a fresh run. The reference model must
    be the run's own base, so a resumed run takes --model from the checkpoint; every flag of `trajectory_flags`
    (those that decide where the run goes) must match, and the number of processes too (the data split and the
    samplers' seeds follow the rank). Part 2 is `restore`, once the models are built."""
    if not args.resume:
        return None, 0
    out = Path(args.out)
    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").exists() and (out / "checkpoint.old" / "state.json").exists():
        ckpt = out / "checkpoint.old"                            # a kill between the two renames
    if not (ckpt / "state.json").exists():
        return None, 0
    state = json.loads((ckpt / "state.json").read_text())
    saved = state["args"]

    def same_path(a, b):
        return a == b or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())
    if args.model is not None and not same_path(args.model, saved["model"]):
        raise ValueError(f"--resume: {ckpt} was trained from --model {saved['model']}, not {args.model}")
    if not same_path(args.train_data, saved.get("train_data")):
        raise ValueError(f"--resume: {ckpt} was trained on --train-data {saved.get('train_data')}, "
                         f"not {args.train_data}")
    saved = {**FLAGS_ADDED_LATER, **saved}
    changed = [k for k in trajectory_flags if k in saved and saved[k] != getattr(args, k)
               and not (k == "precision" and saved[k] == "auto")]     # (older checkpoints recorded it unresolved)
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
        now = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in changed)
        raise ValueError(f"--resume: {ckpt} was made with {was}, not {now} (these decide the run: pass the "
                         "original values, or start a new --out)")
    if state.get("world", world) != world:
        raise ValueError(f"--resume: {ckpt} was written by {state['world']} processes, this run has {world}; the "
                         "data split and the samplers' seeds depend on it: resume with the same number")
    args.model = saved["model"]
    return ckpt, state["step"]


# ------------------------------------------------------------------------------------------------ checkpoints
def save(out: Path, models: dict, state: dict, tokenizer, rank: int, world: int):
    """<out>/checkpoint: weights/ (every model's weights and optimizer state, torch.distributed.checkpoint: each
    rank writes its own shard, nothing is gathered), rng_rank*.pt (each rank's RNG), state.json (`state`),
    tokenizer.json. models: name -> (model, optimizer). Written to checkpoint.tmp, checked to be finite, then
    swapped in by two renames, so a kill at any moment leaves the previous checkpoint (or, between the renames,
    checkpoint.old) whole. (The final policy is exported in HF layout separately: common.export.)"""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    common.barrier(world)
    shards = _shards(models)
    bad = common.non_finite(shards)                                     # this rank's shards; any rank's stops all
    if common.all_sum(bad is not None, world):
        raise ValueError(f"refusing to write a checkpoint at step {state.get('step')}: "
                         f"{bad or 'a tensor on another rank'} is not finite; {final} is untouched")
    _dcp("save", shards, tmp / "weights")                         # each rank writes its own shard
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0)},
               tmp / f"rng_rank{rank}.pt")
    common.barrier(world)                                               # every rank's files are in before the rename
    if rank == 0:
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():                                       # (else: resumed from a lone checkpoint.old, kept
            shutil.rmtree(old, ignore_errors=True)               # until the new one is in place)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    common.barrier(world)


def restore(ckpt: Path, models: dict, rank: int):
    """Load save's weights and optimizer states into the models (name -> (model, optimizer), built as
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
