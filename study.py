"""
Reading runs: what train.py and sft.py wrote (metrics.jsonl, samples.jsonl, args.json, results.json), as the
study's tables and plots. Nothing here loads a model; evaluate.py's command line calls these.

    python evaluate.py --dynamics runs/demo/samples.jsonl     # the behaviour mix per training step (the stages)
    python evaluate.py --compare runs/estimators              # runs grouped by the flags in which they differ
    python evaluate.py --budgets runs/study                   # RLVR's steps against SFT's epochs
    python evaluate.py --spread runs/study/rlvr-seed*         # mean ± std of the demo study over seeds
"""
import json
from pathlib import Path

import demo
import reward
from reward import LABELS, classify

# the demo study's measures of each model and set (evaluate.demo_study writes them, spread reads them)
STUDY_METRICS = ("accuracy", "format_rate", "response_length", "sampled_accuracy", "sampled_format_rate")


# -----------------------------------------------------------------------------
# training dynamics: the behaviour mix per training step of a run's samples.jsonl (labels: reward.classify)

def read_samples(path) -> list[dict]:
    """The rows of a training run's samples.jsonl (blank lines skipped)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i + 1}: bad JSON: {e}") from None
    return rows


def dynamics_table(rows: list[dict], every: int = 1) -> list[dict]:
    """Per bucket of `every` steps (1..every, every+1..2*every, ...; labelled by the largest step present in
    it): n, each label's share, the mean score and the mean think-block length in words; for the demo's questions
    also the share of responses whose work writes the right rule before answering (demo.reasoning)."""
    if every < 1:
        raise ValueError(f"dynamics_table: every must be >= 1, got {every}")
    groups = {}
    for i, r in enumerate(rows):
        try:
            step, response, score = int(r["step"]), str(r["response"]), float(r["score"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"dynamics_table: row {i} malformed ({type(e).__name__}: {e})") from None
        label, n_think = classify(response, r.get("options")), len(reward.read_blocks(response)[0])
        rule = (demo.reasoning(str(r.get("question", "")), response) or (None,))[0]
        groups.setdefault((step - 1) // every, []).append((step, label, score, n_think, rule))
    table = []
    for g in (groups[k] for k in sorted(groups)):
        row = {"step": max(x[0] for x in g), "n": len(g)}
        row.update({lab: sum(x[1] == lab for x in g) / len(g) for lab in LABELS})
        row.update(score=sum(x[2] for x in g) / len(g), think_words=sum(x[3] for x in g) / len(g))
        if all(x[4] is not None for x in g):
            row["right_rule"] = sum(x[4] == "right" for x in g) / len(g)
        table.append(row)
    return table


def format_table(table: list[dict]) -> str:
    """A markdown table of dynamics_table's rows, label shares in percent (and the right rule's, where known)."""
    rule = bool(table) and all("right_rule" in r for r in table)
    lines = ["| step | n | " + " | ".join(lab.replace("_", " ") for lab in LABELS) + " | score | think words |"
             + (" right rule |" if rule else ""), "|" + "---:|" * (len(LABELS) + 4 + rule)]
    for r in table:
        shares = " | ".join(f"{100 * r[lab]:.0f}%" for lab in LABELS)
        lines.append(f"| {r['step']} | {r['n']} | {shares} | {r['score']:.3f} | {r['think_words']:.1f} |"
                     + (f" {100 * r['right_rule']:.0f}% |" if rule else ""))
    return "\n".join(lines)


def plot_dynamics(table: list[dict], path) -> None:
    """A stacked-area PNG of the label shares over steps (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_dynamics needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot([r["step"] for r in table], *[[r[lab] for r in table] for lab in LABELS], labels=LABELS)
    ax.set(xlabel="training step", ylabel="share of sampled responses", ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def show_dynamics(paths, every: int = 1):
    """Print the behaviour mix per training step of a run's samples.jsonl, or of several runs' pooled (seeds: each
    step has as many responses in every run, so the pooled share is the mean share); a PNG beside the first."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    table = dynamics_table([r for p in paths for r in read_samples(p)], every)
    print(format_table(table))
    try:
        plot_dynamics(table, paths[0].with_name("dynamics.png"))
        print(f"plot: {paths[0].with_name('dynamics.png')}")
    except ImportError as e:
        print(f"(no plot: {e})")
    return table


# -----------------------------------------------------------------------------
# estimators side by side: train.py runs that differ in --advantage (and --seed), as in the README's comparison

IGNORED_FLAGS = {"seed", "out", "resume", "overwrite", "eval_every", "save_every", "sample_every", "world", "machine",
                 "micro_batch", "eval_batch", "grad_checkpoint", "offload", "plan"}     # where memory goes, not maths


def read_runs(paths, flag: str) -> dict:
    """Run folders (each with args.json and metrics.jsonl), or folders of such folders -> {run folder: its
    args.json}; none found, or a run without args.json, is a one-line error (`flag` names the option given)."""
    runs = []
    for path in [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        runs += [path] if (path / "metrics.jsonl").is_file() else sorted(p.parent for p in path.glob("*/metrics.jsonl"))
    if not runs:
        raise FileNotFoundError(f"{flag} {' '.join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))}: "
                                "no run folder (*/metrics.jsonl) in it")
    for run in runs:
        if not (run / "args.json").is_file():
            raise FileNotFoundError(f"{run}: no args.json (written by train.py and sft.py at the start of a run)")
    return {run: json.loads((run / "args.json").read_text()) for run in runs}


def differing(flags, ignored) -> list[str]:
    """The flags, other than `ignored`, whose values differ between the runs' args.json dicts."""
    flags = list(flags)
    return sorted(k for k in {k for a in flags for k in a} - ignored if len({json.dumps(a.get(k)) for a in flags}) > 1)


def compare_runs(paths) -> dict:
    """train.py runs (folders with args.json and metrics.jsonl; or folders of such folders), grouped by the flags
    in which they differ (seeds are repeats): {label: {"responses_per_step", "seeds", "eval": {step: [accuracy
    per seed]}, "train": {step: [(accuracy, direct-answer rate) per seed]}, "wall_s", "peak_mem_mb"}}. Wall time
    is the sum of the steps' times (evaluations excluded)."""
    flags = read_runs(paths, "--compare")
    runs, differ = list(flags), differing(flags.values(), IGNORED_FLAGS)
    groups = {}
    for run in runs:
        args, rows = flags[run], read_samples(run / "metrics.jsonl")
        steps = [r for r in rows if "reward" in r]
        # the estimator's name when the estimators differ (their batch shapes follow), else the differing flags
        label = args["advantage"] if "advantage" in differ else ", ".join(f"{k}={args.get(k)}" for k in differ)
        g = groups.setdefault(label or "run", dict(responses_per_step=args["rollout_batch"] * args.get("samples_per_prompt", 1),
                                                   seeds=[], eval={}, ood={}, train={}, wall_s=[], peak_mem_mb=[]))
        g["seeds"].append(args["seed"])
        for r in rows:
            for k in ("eval", "ood"):                       # ood: train.py --ood-data
                if f"{k}_accuracy" in r:
                    g[k].setdefault(r["step"], []).append(r[f"{k}_accuracy"])
        for r in steps:
            g["train"].setdefault(r["step"], []).append((r["accuracy"], r["direct_answer"]))
        g["wall_s"].append(sum(r["time_step"] for r in steps))
        g["peak_mem_mb"].append(max((r.get("peak_mem_mb") or 0.0) for r in steps) if steps else 0.0)
    return groups


def _mean_std(xs):
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def comparison_table(groups: dict) -> str:
    """Markdown: one row per estimator; held-out greedy accuracy at each evaluated step, wall time and peak memory,
    each as mean ± sample std over the seeds."""
    steps = sorted({s for g in groups.values() for s in g["eval"]})
    lines = ["| runs | responses / step | seeds | " + " | ".join(f"acc @ {s}" for s in steps)
             + " | wall time (s) | peak memory (MB) |", "|---" * (len(steps) + 5) + "|"]
    for name, g in groups.items():
        cells = []
        for s in steps:
            xs = g["eval"].get(s)
            cells.append("%.1f ± %.1f" % tuple(100 * v for v in _mean_std(xs)) if xs else "")
        lines.append(f"| {name} | {g['responses_per_step']} | {len(g['seeds'])} | " + " | ".join(cells) +
                     " | %.0f ± %.0f | %.0f ± %.0f |" % (*_mean_std(g["wall_s"]), *_mean_std(g["peak_mem_mb"])))
    return "\n".join(lines) + "\n"


def training_table(groups: dict, every: int = 10) -> str:
    """Markdown: per `every` steps, each group's training accuracy and direct-answer rate (sampled responses, mean
    over the steps and the seeds) side by side."""
    names = list(groups)
    last = max(s for g in groups.values() for s in g["train"])
    lines = ["| steps | " + " | ".join(f"{n}: accuracy | {n}: direct answer" for n in names) + " |",
             "|---" * (2 * len(names) + 1) + "|"]
    for end in range(every, last + every, every):
        cells = []
        for n in names:
            xs = [x for s, v in groups[n]["train"].items() if end - every < s <= end for x in v]
            cells += [f"{100 * sum(a for a, _ in xs) / len(xs):.1f}%", f"{100 * sum(d for _, d in xs) / len(xs):.1f}%"] \
                if xs else ["", ""]
        lines.append(f"| {end - every + 1}-{min(end, last)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(groups: dict, path) -> None:
    """Held-out accuracy over steps, one line per estimator (mean over seeds, the band one std); out-of-distribution
    accuracy (train.py --ood-data) dashed in the same colour."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_comparison needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in groups.items():
        steps = sorted(g["eval"])
        mean, std = zip(*(_mean_std(g["eval"][s]) for s in steps))
        line, = ax.plot(steps, mean, marker="o", label=f"{name} ({len(g['seeds'])} seeds)")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        if g["ood"]:
            ood = sorted(g["ood"])
            ax.plot(ood, [_mean_std(g["ood"][s])[0] for s in ood], linestyle="--", marker="x", color=line.get_color(),
                    label=f"{name}: out of distribution")
    ax.set(xlabel="training step", ylabel="held-out accuracy (greedy)", ylim=(0, 1))
    ax.legend(loc="best", fontsize=8)               # the curves sit near 0 and 1: let it find the gap
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def show_comparison(paths):
    """Print the comparison tables; write comparison.md (and .png) into the first path."""
    groups = compare_runs(paths)
    table = comparison_table(groups) + "\n" + training_table(groups)
    print(table)
    where = Path(paths[0] if isinstance(paths, list) else paths)
    (where / "comparison.md").write_text(table)
    try:
        plot_comparison(groups, where / "comparison.png")
        print(f"plot: {where / 'comparison.png'}")
    except ImportError as e:
        print(f"(no plot: {e})")
    return groups


# -----------------------------------------------------------------------------
# RLVR against SFT at several budgets: held-out accuracy over training, read from the runs' own metrics.jsonl

BUDGET_KEYS = {"eval_accuracy": "in: greedy", "eval_sampled_accuracy": "in: sampled", "ood_accuracy": "out: greedy",
               "ood_sampled_accuracy": "out: sampled"}


# flags that do not change what a point measures: repeats (seeds, base builds), run length, bookkeeping
BUDGET_IGNORED = IGNORED_FLAGS | {"base_seed", "steps", "epochs"}


def budget_points(paths) -> dict:
    """train.py runs (their eval rows, every --eval-every steps) and sft.py runs (a row per epoch), each a folder
    with args.json and metrics.jsonl, or a folder of such folders -> {(label, x): {"questions": [per run],
    "response_tokens": [...], and each BUDGET_KEYS key present: [...]}} at RLVR step x or SFT epoch x. The label
    is "rlvr" or "sft", with the flags in which runs of that kind differ (seeds and base builds are repeats).
    Questions seen: RLVR's prompts (--rollout-batch a step), SFT's examples; response tokens: those sampled by
    RLVR (each is trained on --ppo-epochs times) or read by SFT (its gold answers)."""
    flags = read_runs(paths, "--budgets")
    kind = {run: "rlvr" if "advantage" in a else "sft" for run, a in flags.items()}
    points = {}
    for run in flags:
        args, rows = flags[run], read_samples(run / "metrics.jsonl")
        same_kind = [flags[r] for r in flags if kind[r] == kind[run]]
        builds = {"model"} if len({a.get("base_seed") for a in same_kind}) > 1 else set()   # the demo's bases
        differ = differing(same_kind, BUDGET_IGNORED | builds)
        label = kind[run] + (f" ({', '.join(f'{k}={args.get(k)}' for k in differ)})" if differ else "")
        tokens = 0.0
        for r in rows:
            if "reward" in r:                                # a PPO step: its responses' tokens
                tokens += r["response_length"] * args["rollout_batch"] * args.get("samples_per_prompt", 1)
            if not any(k in r for k in BUDGET_KEYS):         # not an evaluation row
                continue
            x = r["step"] if kind[run] == "rlvr" else r["epoch"]
            seen = dict(questions=x * args["rollout_batch"], response_tokens=tokens) if kind[run] == "rlvr" else \
                dict(questions=r["questions"], response_tokens=r["response_tokens"])
            p = points.setdefault((label, x), {})
            for k, v in {**seen, **{k: r[k] for k in BUDGET_KEYS if k in r}}.items():
                p.setdefault(k, []).append(v)
    return dict(sorted(points.items(), key=lambda kv: (kv[0][0].startswith("sft"), kv[0][0], kv[0][1])))


def budget_table(points: dict) -> str:
    """Markdown: one row per RLVR step and SFT epoch; what each has seen (mean over runs) and its held-out accuracy
    in %, mean ± sample std over the runs (the mean alone for one run)."""
    keys = [k for k in BUDGET_KEYS if any(k in p for p in points.values())]
    lines = ["| model | after | runs | questions seen | response tokens | " + " | ".join(BUDGET_KEYS[k] for k in keys)
             + " |", "|---" * (5 + len(keys)) + "|"]
    for (label, x), p in points.items():
        unit = "step" if label.startswith("rlvr") else "epoch"
        after = "step 0 (the base)" if x == 0 else f"{x} {unit}{'s' * (x > 1)}"
        cells = [("" if k not in p else "%.1f ± %.1f" % tuple(100 * v for v in _mean_std(p[k])) if len(p[k]) > 1
                  else f"{100 * p[k][0]:.1f}") for k in keys]
        lines.append(f"| {label} | {after} | {len(p['questions'])} | {_mean_std(p['questions'])[0]:,.0f} | "
                     f"{_mean_std(p['response_tokens'])[0]:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spread(paths) -> str:
    """Mean ± sample std over runs (one per seed) of each <run>/results.json of demo_study, as markdown."""
    runs = []
    for p in paths:
        if not (Path(p) / "results.json").is_file():
            raise FileNotFoundError(f"{p}: no results.json (run python evaluate.py --rlvr {p} first)")
        runs.append(json.loads((Path(p) / "results.json").read_text()))
    metrics = [m for m in STUDY_METRICS if all(m in r[n][s] for r in runs for n in r for s in r[n])]
    lines = [f"| model ({len(runs)} runs) | split | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
             "|---" * (2 + len(metrics)) + "|"]
    for name in runs[0]:
        for split in runs[0][name]:
            cells = []
            for m in metrics:
                mean, std = _mean_std([r[name][split][m] for r in runs])
                cells.append(f"{mean:.1f} ± {std:.1f}" if m == "response_length" else
                             f"{100 * mean:.1f} ± {100 * std:.1f}")
            lines.append(f"| {name} | {split.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
