"""
Evaluation: the paper's comparisons as one command, and the training-dynamics picture.

    python evaluate.py                     # the CPU demo's study: base, SFT, RLVR, in and out of distribution
    python evaluate.py --model Qwen2.5-3B runs/sft runs/med-rlvr/final \\
        --medqa medqa/test.jsonl --mmlu-pro mmlu_pro/health_test.jsonl --out results.json
    python evaluate.py --dynamics runs/demo/samples.jsonl                      # behaviour mix per training step
    python evaluate.py --compare runs/estimators                               # train.py runs side by side
    python evaluate.py --budgets runs/study                  # RLVR's steps against SFT's epochs, from their metrics

For every model and dataset: greedy accuracy (and, with --samples K - 8 in the demo study - the accuracy, format
rate and behaviour mix of K samples per question at temperature 1), the valid-format rate, the mean response
length in tokens, how often each letter is answered, and the accuracy per category (MedQA meta_info, MMLU-Pro
src). The models sit side by side in a markdown table, printed and written next to results.json (results.md).

--prompt picks how the model is asked:
  rlvr    data.build_prompt (the R1-Zero-style prompt RL trains on), scored by reward.score exactly as in training;
  direct  the paper's base-model baseline: question, options, "Answer:"; the letter is read from the first line;
  cot     the chain-of-thought baseline: "... Let's think step by step."; the letter is read after the last
          "answer is". For these two, "valid format" means a letter could be read.
Under torchrun every rank loads every model whole and decodes its share of the batches (sorted by length; the
same batches and seeds as one process, so the same numbers). Deliberate simplification: greedy decoding stops at
--max-new-tokens (1024, as in training).
"""
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import torch

import common
import data
import demo
import model as M
import reward
import rollout
import study
from reward import LABELS, classify

DIRECT_PROMPT = "Question: {question}\n{options}\nAnswer:"
COT_PROMPT = ("Question: {question}\n{options}\nAnswer the question, then finish with \"The answer is (X)\" "
              "where X is the letter of the correct option.\nAnswer: Let's think step by step.")


def make_prompt(example, style: str) -> str:
    if style == "rlvr":
        return data.build_prompt(example)
    options = "\n".join(f"{k}. {v}" for k, v in example.options.items())
    return (DIRECT_PROMPT if style == "direct" else COT_PROMPT).format(question=example.question.strip(),
                                                                       options=options)


def read_answer(response: str, style: str):
    """-> (valid, letter or None) of one decoded response, for the given prompt style."""
    if style == "rlvr":
        valid, letter, _, _ = reward.parse(data.PROMPT_PREFILL + response)
        return valid, letter
    if style == "direct":
        letter = reward.read_letter(response.strip().split("\n")[0])
    else:
        at = response.lower().rfind("answer is")     # "The answer is (C)", "the answer is: **C**"
        rest = response[at + len("answer is"):].split("\n")[0].lstrip(" :*") if at >= 0 else ""
        letter = reward.read_letter(rest.replace("*", "")) if at >= 0 else None
    return letter is not None, letter


@torch.no_grad()
def run_model(policy, tok, examples, style, temperature, max_new_tokens, batch, seed=0, rank=0, world=1):
    """Generate one response per example -> list of (response ids, text), on every rank. The examples are batched
    by prompt length and rank r decodes batches r, r + world, ...; each batch samples from its own seeded generator,
    so the responses are those of one process whatever the number of ranks."""
    prompts = [e.ids for e in tok.encode_batch([make_prompt(ex, style) for ex in examples])]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[k:k + batch] for k in range(0, len(order), batch)]
    mine = []
    for b in range(rank, len(batches), world):
        gen = torch.Generator(policy.lm_head.weight.device).manual_seed(seed * 1_000_003 + b)
        r = rollout.generate(policy, [prompts[i] for i in batches[b]], max_new_tokens, temperature=temperature,
                             eos_token_id=data.eos_token_id(tok), generator=gen)
        mine += list(zip(batches[b], r.responses))
    out = [None] * len(prompts)
    for i, resp in common.gather(mine, world):
        out[i] = (resp, data.decode(tok, resp))
    return out


def verdict(example, text, style) -> tuple[bool, str | None, bool]:
    """(valid format, the letter read, right) of one response; for the rlvr prompt exactly the training reward's
    verdict."""
    ok, letter = read_answer(text, style)
    if style == "rlvr":
        return ok, letter, reward.score(data.PROMPT_PREFILL + text, example.answer) == 1.0
    return ok, letter, ok and letter == example.answer


def evaluate_one(policy, tok, examples, *, prompt="rlvr", samples=0, max_new_tokens, batch, rank=0,
                 world=1, reasoning=None) -> dict:
    """One model on one set: greedy accuracy, format rate, response length, letters and per-category accuracy;
    with `samples` = K also the accuracy, format rate and behaviour mix of K responses per question at T = 1, and
    with `reasoning` (the demo's demo.reasoning: question, response -> (rule, letter)) the share of those responses
    whose work writes each rule before answering, and within each how often the letter it ends on is right and
    how often the reward is +1: does the reasoning reach the answer, and does it pay?"""
    greedy = run_model(policy, tok, examples, prompt, 0.0, max_new_tokens, batch, rank=rank, world=world)
    right, valid, letters, per_cat = 0, 0, Counter(), defaultdict(list)
    for ex, (ids, text) in zip(examples, greedy):
        ok, letter, hit = verdict(ex, text, prompt)
        right, valid = right + hit, valid + ok
        letters[letter or "none"] += 1
        per_cat[ex.category].append(hit)
    n = len(examples)
    result = {"n": n, "accuracy": right / n, "format_rate": valid / n,
              "response_length": sum(len(ids) for ids, _ in greedy) / n,
              "letters": dict(sorted(letters.items())),
              "per_category": {c: sum(v) / len(v) for c, v in sorted(per_cat.items())}}
    if samples:           # K responses per question at temperature 1: less of a knife edge than the greedy one
        hits = valid = 0
        behaviour, rules, letter_hits, rule_hits = Counter(), Counter(), Counter(), Counter()
        solved = [0] * n                                               # per question: how many of its K are right
        for k in range(samples):       # sample k of every question from seed k: the same draws at every step
            sampled = run_model(policy, tok, examples, prompt, 1.0, max_new_tokens, batch, seed=k, rank=rank,
                                world=world)
            for i, (ex, (_, text)) in enumerate(zip(examples, sampled)):
                ok, _, hit = verdict(ex, text, prompt)
                hits, valid, solved[i] = hits + hit, valid + ok, solved[i] + hit
                if prompt == "rlvr":
                    behaviour[classify(data.PROMPT_PREFILL + text, ex.options)] += 1
                if reasoning:
                    rule, letter = reasoning(ex.question, text)
                    rules[rule], rule_hits[rule] = rules[rule] + 1, rule_hits[rule] + hit
                    letter_hits[rule] += letter == ex.answer
        total = n * samples
        result.update(sampled_accuracy=hits / total, sampled_format_rate=valid / total,
                      pass_at_k=[sum(pass_at_k(samples, c, k) for c in solved) / n for k in range(1, samples + 1)])
        if reasoning:     # per rule: its share of the sampled responses; of those, letter right and reward +1
            result["reasoning"] = {r: {"share": rules[r] / total,
                                       "letter_right": letter_hits[r] / rules[r] if rules[r] else None,
                                       "accuracy": rule_hits[r] / rules[r] if rules[r] else None}
                                   for r in ("right", "wrong", "none")}
        if behaviour:
            result["behaviour"] = {label: behaviour[label] / total for label in LABELS}
    return result


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k responses drawn without replacement from n, c of them right, is right:
    1 - C(n - c, k) / C(n, k), the unbiased pass@k estimator (Chen et al. 2021). pass@1 is c / n."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def held_out_sets(args, world: int, demo_default: bool) -> dict:
    """The held-out sets train.py and sft.py evaluate, name -> examples: --eval-data (MedQA's schema) as "eval",
    --ood-data (MMLU-Pro's, its --ood-category rows) as "ood", hub ids read from the HF cache; without --eval-data
    and with `demo_default` (the demo's questions), the demo's two families; each cut to its first --eval-limit."""
    held = demo.held_out() if demo_default and args.eval_data is None else {}
    if args.eval_data is not None:
        held["eval"] = data.load_medqa(common.from_hub(args.eval_data, "data", "test", world))
    if args.ood_data is not None:
        held["ood"] = data.load_mmlu_pro(common.from_hub(args.ood_data, "data", "test", world), args.ood_category)
    return {k: v[:args.eval_limit or None] for k, v in held.items()}


def held_out_row(policy, tok, held: dict, *, samples, max_new_tokens, batch, rank=0, world=1) -> dict:
    """The held-out columns of train.py's and sft.py's metrics rows, for each set name in `held` ("eval", "ood"):
    name_accuracy and name_format (greedy), and with `samples` name_sampled_accuracy and name_sampled_format.
    A sharded policy decodes from its full weights, gathered once (common.full_weights)."""
    row, results = {}, {}
    with common.full_weights(policy) as plain:
        for name, examples in held.items():
            results[name] = evaluate_one(plain, tok, examples, samples=samples, max_new_tokens=max_new_tokens,
                                         batch=batch, rank=rank, world=world)
    for name, r in results.items():
        row[f"{name}_accuracy"], row[f"{name}_format"] = r["accuracy"], r["format_rate"]
        if samples:
            row[f"{name}_sampled_accuracy"], row[f"{name}_sampled_format"] = r["sampled_accuracy"], \
                r["sampled_format_rate"]
    return row


def reasoning_table(results: dict) -> str:
    """Does the reasoning pay? For each model and set with sampled reasoning counts (evaluate_one's `reasoning`):
    the share of sampled responses whose work writes the right rule, the wrong rule or no work before answering,
    and within each how often the letter it ends on is right and how often the reward is +1 (a valid format too)."""
    lines = ["| model | set | sampled accuracy | right rule | its letter right | its reward +1 | wrong rule | its "
             "letter right | no work first | its letter right |", "|---" * 10 + "|"]
    pct = lambda x: "-" if x is None else f"{x:.1%}"                                        # noqa: E731
    for m, sets in results.items():
        for d, r in sets.items():
            if "reasoning" in r:
                right, wrong, none = (r["reasoning"][k] for k in ("right", "wrong", "none"))
                cells = [right["share"], right["letter_right"], right["accuracy"], wrong["share"],
                         wrong["letter_right"], none["share"], none["letter_right"]]
                lines.append(f"| {Path(m).name or m} | {d} | {pct(r['sampled_accuracy'])} | "
                             + " | ".join(pct(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def decoding(args) -> dict:
    """evaluate_one's keywords from this script's flags."""
    return dict(prompt=args.prompt, samples=args.samples, max_new_tokens=args.max_new_tokens, batch=args.batch)


def markdown(results: dict) -> str:
    """Models side by side: one row per dataset and metric, one column per model."""
    models = list(results)
    lines = ["| | " + " | ".join(Path(m).name or m for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    datasets = list(next(iter(results.values())))
    for d in datasets:
        for key, label in (("accuracy", "accuracy (greedy)"), ("sampled_accuracy", "accuracy (sampled)"),
                           ("format_rate", "valid format"), ("sampled_format_rate", "valid format (sampled)"),
                           ("response_length", "response tokens")):
            if key not in results[models[0]][d]:
                continue
            cells = [results[m][d][key] for m in models]
            fmt = "{:.1f}" if key == "response_length" else "{:.1%}"
            lines.append(f"| {d} {label} | " + " | ".join(fmt.format(c) for c in cells) + " |")
    report = "\n".join(lines) + "\n"
    if any("reasoning" in r for sets in results.values() for r in sets.values()):
        report += "\ndoes the reasoning pay? (demo.reasoning)\n\n" + reasoning_table(results)
    return report


# -----------------------------------------------------------------------------
# the CPU demo's study: base, SFT and RLVR, in and out of distribution (python evaluate.py, no flags)

def demo_study(args) -> dict:
    """Evaluate the demo's base, SFT and RLVR models on N held-out questions of the training family (in
    distribution) and of the other family (out of distribution), greedy and sampled (--samples, 8 by default here:
    accuracy, format rate and the behaviour mix); write <rlvr>/results.json and
    results.md, with the behaviour mix per training step of <rlvr>/samples.jsonl (and dynamics.png)."""
    for name, run in (("sft", Path(args.sft)), ("rlvr", Path(args.rlvr))):     # made from another base build?
        made = json.loads((run / "args.json").read_text()) if (run / "args.json").is_file() else {}
        if made.get("base_seed", args.base_seed) != args.base_seed:
            raise ValueError(f"--{name} {run} was trained from base build {made['base_seed']}, not --base-seed "
                             f"{args.base_seed}: give --{name} a run made from it")
    models = {"base": Path(args.base or demo.base_path(args.base_seed)), "sft": Path(args.sft),
              "rlvr": Path(args.rlvr) / "final"}
    for name, path in models.items():                            # all checked before the first is evaluated
        if not (path / "config.json").is_file():
            how = {"base": "train.py builds it", "sft": "run sft.py", "rlvr": "run train.py"}[name]
            raise FileNotFoundError(f"{path}: no {name} model ({how}; or give --{name})")
        common.check_checkpoint(path)
    n = args.dose or 256
    splits = {"in_distribution": demo.questions("eval", n),                               # train.py's eval set
              "out_of_distribution": demo.questions("eval", n, family="tablets")}
    results = {}
    for name, path in models.items():
        tok, policy = data.load_tokenizer(path), M.load_model(path)
        results[name] = {split: {k: v for k, v in evaluate_one(policy, tok, exs, **decoding(args),
                                                               reasoning=demo.reasoning).items()
                                 if k in study.STUDY_METRICS + ("behaviour", "reasoning", "pass_at_k")}
                         for split, exs in splits.items()}
        print(f"{name}: " + ", ".join(f"{s} {r['accuracy']:.1%}" for s, r in results[name].items()))
    out = Path(args.rlvr)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    metrics = [m for m in study.STUDY_METRICS if m in results["base"]["in_distribution"]]   # sampled ones: --samples
    lines = ["| model | " + " | ".join(f"{s.replace('_', ' ')}: {m.replace('_', ' ')}" for s in splits
                                        for m in metrics) + " |", "|---" * (1 + 2 * len(metrics)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[s][m]:.1f}" if m == "response_length" else f"{r[s][m]:.1%}"
                                                 for s in splits for m in metrics) + " |")
    report = (f"{n} held-out questions per set; greedy decoding" + (f", and {args.samples} responses per question "
              "sampled at temperature 1 (sampled_*)" if args.samples else "") + "\n\n" + "\n".join(lines) + "\n")
    if args.samples:                                # why RL works or not: does writing the right rule pay?
        report += ("\ndoes the reasoning pay? the sampled held-out responses by the rule their work writes "
                   "before answering (demo.reasoning), and how often each reaches the right letter\n\n" + reasoning_table(
                       {name: {s.replace("_", " "): r[s] for s in splits} for name, r in results.items()}))
    if args.samples:                                # does RL sharpen what the base can do, or go beyond it?
        ks = range(1, args.samples + 1)
        report += ("\npass@k of the sampled held-out responses (unbiased estimator from the K samples)\n\n| model | set | "
                   + " | ".join(f"pass@{k}" for k in ks) + " |\n" + "|---" * (2 + len(ks)) + "|\n"
                   + "".join(f"| {name} | {s.replace('_', ' ')} | " + " | ".join(f"{p:.1%}" for p in r[s]["pass_at_k"])
                             + " |\n" for name, r in results.items() for s in splits))
    if args.samples and args.prompt == "rlvr":      # the base's own mix is the stages' step 0
        report += ("\nbehaviour of the sampled held-out responses (reward.classify)\n\n| model | set | "
                   + " | ".join(LABELS) + " |\n" + "|---" * (2 + len(LABELS)) + "|\n"
                   + "".join(f"| {name} | {s.replace('_', ' ')} | " + " | ".join(f"{r[s]['behaviour'][label]:.1%}"
                                                                              for label in LABELS) + " |\n"
                             for name, r in results.items() for s in splits))
    if (out / "samples.jsonl").is_file():
        table = study.dynamics_table(study.read_samples(out / "samples.jsonl"), every=10)
        report += "\nbehaviour of the sampled training responses (reward.classify), per 10 steps\n\n" + \
            study.format_table(table) + "\n"
        try:
            study.plot_dynamics(table, out / "dynamics.png")
        except ImportError as e:
            print(f"(no plot: {e})")
    (out / "results.md").write_text(report)
    print(report)
    return results


def make_parser():
    parser = common.parser(__doc__)
    c = common
    parser.add_argument("--model", nargs="+", default=[],
                        help="checkpoint folders (HF layout) or hub ids, side by side")
    parser.add_argument("--medqa", help="MedQA test questions: a file (data.SCHEMAS) or a hub id, org/name[:split]")
    parser.add_argument("--mmlu-pro", help="MMLU-Pro: a jsonl/parquet file or a hub id (TIGER-Lab/MMLU-Pro); its "
                                           "health category is used")
    parser.add_argument("--dose", type=c.nonneg_int, default=0, help="N held-out questions of each of the CPU demo's "
                                                                     "two families (with --samples: does the reasoning "
                                                                     "pay?)")
    parser.add_argument("--prompt", choices=["rlvr", "direct", "cot"], default="rlvr",
                        help="how the model is asked (see the docstring)")
    parser.add_argument("--limit", type=c.nonneg_int, default=0, help="first N questions of each dataset (0: all)")
    parser.add_argument("--samples", type=c.nonneg_int, default=0,
                        help="K responses per question sampled at temperature 1: their mean accuracy, format rate and "
                             "behaviour mix (each K is one more decode of every set; the demo study's default is 8)")
    parser.add_argument("--max-new-tokens", type=c.positive_int, default=1024, help="response budget in tokens")
    parser.add_argument("--batch", type=c.positive_int, default=64, help="prompts per decoding batch")
    parser.add_argument("--out", default="results.json", help="results as JSON; a markdown table beside it (.md)")
    parser.add_argument("--dynamics", nargs="+", help="samples.jsonl of a training run (of several: pooled): print "
                                                      "the behaviour mix per step")
    parser.add_argument("--every", type=c.positive_int, default=1, help="with --dynamics: steps per table row")
    parser.add_argument("--base", help="without --model: the demo's base model (default: demo_base/ for --base-seed "
                                       "0, runs/demo-base-seed<N> for N)")
    parser.add_argument("--base-seed", type=int, default=0, help="without --model: which demo base build")
    parser.add_argument("--sft", default="runs/demo-sft", help="without --model: the demo's SFT baseline")
    parser.add_argument("--rlvr", default="runs/demo", help="without --model: the demo's RLVR run folder "
                                                            "(final/, samples.jsonl); results are written there")
    parser.add_argument("--spread", nargs="+", help="RLVR run folders of several seeds, each with its results.json: "
                                                    "mean ± std")
    parser.add_argument("--budgets", nargs="+", help="train.py and sft.py runs (or folders of runs) evaluated along "
                                                     "the way: held-out accuracy per RLVR step and SFT epoch, with "
                                                     "what each has seen, mean ± std over the runs")
    parser.add_argument("--compare", nargs="+", help="train.py runs, or folders of runs, grouped by the flags in which "
                                                     "they differ: accuracy over steps, direct-answer rate, wall time "
                                                     "and peak memory side by side")
    return parser


def main(argv=None):
    parser = make_parser()
    known = parser.parse_known_args(argv)[0]
    if not (known.model or known.dynamics or known.compare or known.spread or known.budgets):
        parser.set_defaults(max_new_tokens=40, batch=128, samples=8)   # the demo study: train.py's demo budget
    args = parser.parse_args(argv)
    if args.dynamics:
        return study.show_dynamics(args.dynamics, args.every)
    if args.compare:
        return study.show_comparison(args.compare)
    if args.budgets:
        table = study.budget_table(study.budget_points(args.budgets))
        print(table)
        return table
    if args.spread:
        table = study.spread(args.spread)
        print(table)
        return table
    if not args.model:                           # no flags: the CPU demo's study
        if args.medqa or args.mmlu_pro:
            parser.error("--medqa / --mmlu-pro need --model DIR [DIR ...]")
        return demo_study(args)

    rank, world, device = common.init_distributed()  # under torchrun each rank decodes its share of every set
    datasets = {}         # a hub id becomes its files in the HF cache (split test unless it names one)
    models = {name: common.from_hub(name, "model", world=world) for name in args.model}     # as the user named it
    if args.medqa:
        datasets["MedQA"] = data.load_medqa(common.from_hub(args.medqa, "data", "test", world))
    if args.mmlu_pro:     # the whole test set (12,032 rows) or its health rows (818): keep the health category
        datasets["MMLU-Pro-Health"] = data.load_mmlu_pro(common.from_hub(args.mmlu_pro, "data", "test", world),
                                                         category="health")
    if args.dose:
        datasets["Dose (demo)"] = demo.questions("eval", args.dose)                # the demo's held-out questions,
        datasets["Dose, other family (demo)"] = demo.questions("eval", args.dose, family="tablets")   # both families
    if not datasets:
        parser.error("give at least one of --medqa, --mmlu-pro, --dose")
    if args.limit:
        datasets = {k: v[:args.limit] for k, v in datasets.items()}

    for path in models.values():                 # every model is checked before the first one is evaluated
        common.check_checkpoint(path)
    results = {}
    for label, path in models.items():
        tok, policy = data.load_tokenizer(path), M.load_model(path, device=device)
        results[label] = {name: evaluate_one(policy, tok, exs, **decoding(args), rank=rank, world=world,
                                             reasoning=demo.reasoning if name.startswith("Dose") else None)
                          for name, exs in datasets.items()}
        if rank == 0:
            print(f"{label}: " + ", ".join(f"{d} {r['accuracy']:.1%}" for d, r in results[label].items()))
    if rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(markdown(results))
        print(markdown(results))
    common.finish(world)
    return results


if __name__ == "__main__":
    common.cli(main)
