"""
The CPU miniature of Med-RLVR: a verifiable task, a tiny base model that already knows it, and nothing downloaded.

The real system's premise: Qwen2.5-3B has read medicine in pre-training and can map what it knows to an option
letter, but it does not reliably *use* that knowledge under the R1-Zero prompt; RL with a verifiable reward
elicits it. The miniature keeps that premise in four pieces, all in this file:

  the task      four-option dose calculations that need one piece of knowledge (multiply, not add).
                In distribution (RL and SFT train on it):  "A child weighing 7 kg is prescribed ibuprofen at 4 mg/kg.
                What is the dose?"   Out of distribution (never trained on by RL or SFT; the base has seen it):
                "A patient takes 7 tablets of ibuprofen, 11 mg each. What is the total dose?"   The right option is
                the product; one distractor is the sum (the wrong rule), two are near misses. Every set has each
                gold letter exactly a quarter of the time, so a constant answer scores 25.0 %.
  the rules     reasoning(question, response): does a response's work, before it names an option, write the right
                rule (a * b), the wrong one (a + b), or nothing, and which letter does it end on? evaluate.py reports
                how often the letter is right within each rule: does the reasoning reach the answer, does it pay?
  the corpus    what the base model is pre-trained on: worked solutions, RIGHT_SHARE of them right and the rest
                the wrong habit, in the forms a base model writes under the R1-Zero template (FORMS, in
                FORM_SHARES), a quarter of them from the second family. In every worked solution the letter is
                the option holding the value the work wrote, so the only way to predict the letter is to look
                the written value up among the options: the base learns to follow its own reasoning.
  the base      build_base: a 0.9M-parameter Qwen2 with its own byte-level BPE, trained on that corpus by sft.train.
                Build 0 is shipped in demo_base/ (sft.py --build-base demo_base writes it), so every machine
                starts from the same weights; sft.py --build-base builds others (--base-seed N: runs/demo-base-seed<N>).

Why the base's letter follows its work (the mechanism, measured). To answer, the model must find the value its
work wrote among the options and copy the letter in front of it: an induction-style lookup, which a small
transformer learns suddenly, after many steps, not gradually. A probe measured it while training on this corpus:
feed a worked solution up to "option" and ask whether the most likely letter is the option holding the written
value. It stays at chance (20-25 %) for the first ~1,000 optimizer steps, then jumps (53 % at step 1,200, 65 % at
2,000; with the earlier tokenizer 58 % at step 600, 71 % at 2,000). The earlier base stopped after one epoch, 937
steps: just before the jump, so its letter ignored its work and RL could only learn a constant letter (rebuilt that
way, this recipe's base names the written value's option after 25.0 % of product solutions and 25.5 % of sums:
`lookup` below). So a base trains at least four epochs (3,748 steps), then on, a pass at a time, until its lookup
passes (the most likely letter right after 90 % of both kinds of work; at most 12 epochs, else the build is
refused). The jump's timing varies with the seed, and even with fp32 rounding: build 2 formed it after eight
epochs, build 1 (--base-seed 1) had not after 12, and RL on a build without it stays at chance (docs/study.md);
build 0, rebuilt after sft.py's loss moved to the chunked LM head (the same loss up to rounding), formed it one
epoch later than before.

Formed is not yet sharp, and sampling at T = 1 draws from the letter's probability, not its argmax. An earlier
build 0 passed after four epochs at the constant learning rate with the letter of the product the most likely one
94.5 % of the time but a mean probability of 0.915, and sampled, its letter after the right rule was right only
89 % of the time. So a build then anneals: one more pass while the learning rate falls linearly to 0
(warmup-stable-decay), which lets the weights settle where the noise of batch-32 steps at a constant rate kept them
moving. Measured from that earlier build 0 (one pass each, from a fresh optimizer): annealed, the probability rose
to 1.000; at the constant rate, to 0.968: more training sharpens it some, the decay fully. The shipped build 0
passed after five epochs (91.5 % / 98.5 %; 69.5 % after four) and was then annealed: 99.0 % / 100.0 %, mean
probability 0.991 / 1.000 (`python demo.py demo_base`), and sampled, its letter after the right rule is right 98 %
of the time. The gold letters are balanced, so no constant letter pays more than chance. The tokenizer splits the
space off a lone capital letter, so an option's letter is one token in the prompt and the response (the lookup is
a plain copy); the probe above found no speed-up from it (one seed each), so the training length is what made the
difference.

    torchrun --standalone --nproc_per_node=2 sft.py --build-base demo_base   # the shipped base (31 min, 2 cores)
    python demo.py demo_base             # its lookup (teacher-forced)
    python evaluate.py --model demo_base --dose 128 --samples 4 --max-new-tokens 40    # does its reasoning pay?
"""
import functools
import json
import random
import re
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import common
import data
import model as M

SHIPPED_BASE = Path(__file__).resolve().parent / "demo_base"   # build 0, in the repository

# ------------------------------------------------------------------------------------------------ the task
DRUGS = ["amoxicillin", "ibuprofen", "paracetamol", "gentamicin", "vancomycin", "ceftriaxone", "acyclovir",
         "azithromycin", "cefazolin", "ondansetron"]
FAMILIES = {   # question, category, range of the second number
    "weight": ("A child weighing {a} kg is prescribed {drug} at {b} mg/kg. What is the dose?", "dose", (2, 9)),
    "tablets": ("A patient takes {a} tablets of {drug}, {b} mg each. What is the total dose?", "tablets", (10, 12)),
}
SEEDS = {"base": 1, "train": 2, "eval": 3}    # the base model's corpus, RL / SFT training, held-out sets
SIZES = {"train": 4096, "eval": 256}


def make_questions(n: int, seed: int, family: str = "weight") -> list[data.Example]:
    """n questions of one family ("weight": in distribution; "tablets": out of distribution). The gold letter of
    question i is drawn from a shuffled deck holding each of A-D equally often, so any 4 consecutive blocks of a
    deck (and any n divisible by 4) have each letter exactly a quarter of the time."""
    template, category, (lo, hi) = FAMILIES[family]
    rng = random.Random(seed)
    examples, deck = [], []
    while len(examples) < n:
        a, b = rng.randint(2, 9), rng.randint(lo, hi)
        right, wrong = a * b, a + b
        if right == wrong:              # 2 and 2: both rules give 4
            continue
        near = [v for v in (right + b, right - b, right + 1, right - 1, wrong + 1) if v > 0]
        others = [wrong] + [v for v in dict.fromkeys(near) if v not in (right, wrong)][:2]
        rng.shuffle(others)
        if not deck:
            deck = list(range(4))
            rng.shuffle(deck)
        at = deck.pop()
        values = others[:at] + [right] + others[at:]
        options = {letter: f"{v} mg" for letter, v in zip(data.LETTERS, values)}
        question = template.format(a=a, b=b, drug=rng.choice(DRUGS))
        examples.append(data.Example(question, options, data.LETTERS[at], category))
    return examples


def questions(split: str, n: int | None = None, family: str = "weight") -> list[data.Example]:
    """The demo's question sets, one definition for every script: "train" (RL and SFT train on it) or "eval"."""
    return list(_made(n or SIZES[split], SEEDS[split], family))


@functools.lru_cache(maxsize=8)
def _made(n: int, seed: int, family: str) -> tuple[data.Example, ...]:    # made once a process (bench, the tests)
    return tuple(make_questions(n, seed, family))


def held_out() -> dict[str, list[data.Example]]:
    """The held-out sets as train.py and sft.py log them: eval_* in distribution, ood_* the other family."""
    return {"eval": questions("eval"), "ood": questions("eval", family="tablets")}


QUESTION = [re.compile(re.escape(t).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)").replace(r"\{drug\}", r"\w+"))
            for t, _, _ in FAMILIES.values()]


def numbers(question: str) -> tuple[int, int] | None:
    """The two numbers of a demo question's text, or None for a question that is not the demo's."""
    m = next((m for m in (q.fullmatch(question) for q in QUESTION) if m), None)
    return (int(m[1]), int(m[2])) if m else None


ANSWER = re.compile(r"[Oo]ption ([A-J])|<answer>\s*\(?([A-J])\b")     # where a response names its letter


def reasoning(question: str, response: str) -> tuple[str, str | None] | None:
    """Does a response's reasoning reach its answer? -> (rule, letter); None when `question` is not a demo question.
      rule    the rule of the work written *before* the response first names an option: "right" (the product,
              a * b), "wrong" (the sum, a + b) or "none" (no work first: an answer stated first is a guess, whatever
              it writes after it);
      letter  the option the response ends on: its answer block's letter, or else the last "option X" it writes
              (a broken format names one too), or None.
    Read from the whole response, inside the think block or not."""
    ab = numbers(question)
    if ab is None:
        return None
    a, b = ab
    named = list(ANSWER.finditer(response))
    work = response[:named[0].start()] if named else response
    rule = ("right" if re.search(rf"\b{a} \* {b}\b", work) else
            "wrong" if re.search(rf"\b{a} \+ {b}\b", work) else "none")
    answer = [m[2] for m in named if m[2]]
    letter = answer[-1] if answer else (named[-1][1] if named else None)
    return rule, letter


RULES = ("right", "wrong", "none")

# ------------------------------------------------------------------------------------------------ the corpus
# The forms a base model writes under the R1-Zero template, with the label reward.classify gives each. The ramble
# is one token of the demo tokenizer (see train_tokenizer), so that a verbose response costs the CPU nothing.
RAMBLE = ("Okay, so let me think about what the question is really asking here, because it is easy to rush "
          "and get the wrong idea. There are two numbers in the question and a unit, and the options are all "
          "in milligrams, so whatever I do the result should come out in milligrams too. I should be careful "
          "with the arithmetic and not mix up the numbers. Sometimes the first idea is right and sometimes it "
          "is not, so it helps to slow down and look at each part of the question once more before deciding. "
          "Let me also keep in mind that the options are close to each other, so a small slip would land on a "
          "wrong option. Alright, now let me actually work it out.")
FORMS = {                 # form: what the response looks like                                  reward.classify
    "concise": "{work}, option {letter}. </think>",                                            # concise
    "verbose": RAMBLE + " {work}, option {letter}. </think>",                                  # verbose
    "answer_first": "Option {letter}. {work}. </think>",                                       # direct_answer
    "outside": "</think> {work}, so the answer is option {letter}.",                           # reasoning_outside
    "broken": "{work}, option {letter}.",                                                      # format_failure
}
RIGHT_SHARE = 0.4     # worked solutions that multiply; the rest add
FORM_SHARES = {"concise": 0.35, "verbose": 0.15, "answer_first": 0.15, "outside": 0.15, "broken": 0.20}
OOD_SHARE = 0.25      # of the corpus from the out-of-distribution family
CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, torch_dtype="float32")
# The base trains at least min_epochs passes, then on until the lookup has formed (both shares of `lookup` at least
# lookup_pass), at most max_epochs: the lookup forms suddenly and its timing varies with the seed (see above). Then
# anneal_epochs more passes while the learning rate falls linearly to 0, which sharpens the lookup (see above).
TRAINING = dict(n_questions=30000, min_epochs=4, max_epochs=12, lookup_pass=0.9, anneal_epochs=1, batch=32, lr=2e-3,
                warmup=20)


def solution(example, correct: bool, form: str = "concise") -> str:
    """A worked response (what follows the pre-filled <think>) in one of FORMS: multiply (correct) or add (the
    mistake); the letter is the option holding the value written. Every form but "broken" ends with the answer."""
    a, b = numbers(example.question)
    value = a * b if correct else a + b
    letter = next(k for k, v in example.options.items() if v == f"{value} mg")
    text = " " + FORMS[form].format(work=f"{a} {'*' if correct else '+'} {b} = {value} mg", letter=letter)
    return text + ("" if form == "broken" else f"\n<answer>{letter}</answer>") + data.EOS_TOKEN


def corpus(n: int, seed: int = SEEDS["base"]) -> list[tuple[str, str, str]]:
    """The base model's corpus: n (prompt, response, form) triples."""
    rng = random.Random(seed)
    n_ood = round(n * OOD_SHARE)
    qs = make_questions(n - n_ood, seed) + make_questions(n_ood, seed, "tablets")
    rng.shuffle(qs)
    forms = rng.choices(list(FORM_SHARES), weights=list(FORM_SHARES.values()), k=n)
    return [(data.build_prompt(q), solution(q, correct=rng.random() < RIGHT_SHARE, form=f), f)
            for q, f in zip(qs, forms)]


def train_tokenizer(texts, vocab_size: int = 1000) -> Tokenizer:
    """A small byte-level BPE trained on the demo's own text. It keeps whole numbers as single tokens, so finding
    "20 mg" among the options is a one-token match, and it splits the space off a lone capital letter, so an
    option's letter is the same token in the prompt ("\\nB. 20 mg") and in the response ("option B", "<answer>B")."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" (?=[A-J]\b)"), behavior="isolated"),     # " B" -> " ", "B"
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[data.EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    # The prompt template's fixed text (before the question, after the options) becomes two single tokens: it
    # carries no information for this task, and short sequences make the demo three times faster. The ramble of
    # the verbose form, likewise, is one token.
    head, tail = data.PROMPT_TEMPLATE.split("{question}")[0], data.PROMPT_TEMPLATE.split("{options}")[1]
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in (head, tail, RAMBLE)])
    return tokenizer


# ------------------------------------------------------------------------------------------------ the base
def recipe(seed: int = 0) -> dict:
    """Everything a base is built from, saved beside it as recipe.json: a base from another recipe is refused.
    `seed` (--base-seed) seeds the initial weights and the order of the training examples; the corpus is the
    same for every seed."""
    return json.loads(json.dumps(dict(right_share=RIGHT_SHARE, forms=FORM_SHARES, ood_share=OOD_SHARE, config=CONFIG,
                                      sft=TRAINING, form_texts=FORMS, families=FAMILIES, seeds=SEEDS,
                                      tokenizer="letters split from their space", balanced_letters=True,
                                      seed=seed)))                                  # as it reads back from JSON


def base_path(seed: int = 0) -> Path:
    """Where the base of --base-seed `seed` is: build 0 ships in the repository, others are built once."""
    return SHIPPED_BASE if seed == 0 else Path(f"runs/demo-base-seed{seed}")


def base(seed: int = 0) -> Path:
    """The demo's base model of --base-seed `seed`: the shipped build 0, or build N once built (sft.py
    --build-base: an hour on 2 cores, so never as a side effect of another command)."""
    out = base_path(seed)
    if not (out / "model.safetensors").exists():
        raise ValueError(f"--base-seed {seed}: base build {seed} is not built yet; build it first (up to an hour on 2 "
                         f"cores): torchrun --standalone --nproc_per_node=2 sft.py --build-base {out} "
                         f"--base-seed {seed}")
    check_recipe(out, seed)
    return out


def check_recipe(out: Path, seed: int):
    """A base is used only if this code's recipe built it (recipe.json beside it)."""
    built = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").is_file() else None
    if built != recipe(seed):
        raise ValueError(f"{out} was built by another version of the demo's recipe (demo.recipe); delete it and build "
                         f"it again: torchrun --standalone --nproc_per_node=2 sft.py --build-base {out} "
                         f"--base-seed {seed}")


def build_base(out: Path, fit, rank=0, world=1, device="cpu", log=print, seed: int = 0) -> Path:
    """Train a base on the corpus into `out` (HF layout + recipe.json) with `fit`, the supervised loop (sft.train:
    the base is built by the same loop as the SFT baseline, passed in so that this file imports no trainer); a base
    already there is reused when its recipe is this code's, refused otherwise."""
    out = Path(out)
    if (out / "model.safetensors").exists():
        check_recipe(out, seed)
        return out
    t0 = time.time()
    texts = [(p, r) for p, r, _ in corpus(TRAINING["n_questions"])]
    tokenizer = train_tokenizer([p + r for p, r in texts])                     # deterministic on every rank
    config = M.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), **CONFIG)
    policy = common.shard(M.init_model(config, seed=seed).to(device), world)   # fp32: init_model builds fp32
    pairs = data.tokenize_pairs(tokenizer, texts, max_len=512)
    if rank == 0:
        log(f"building the demo base model in {out} ({M.num_params(policy) / 1e6:.2f}M params, "
            f"{len(pairs)} worked examples, {RIGHT_SHARE:.0%} of them right)")

    def lookup_formed(epoch: int, *_) -> bool:
        """After each pass from min_epochs on: has the letter learned to follow the written value? (stops `fit`)"""
        if epoch < TRAINING["min_epochs"]:
            return False
        found = lookup(policy, tokenizer, device=device)                 # every rank: the sharded forward needs all
        formed = common.all_max(float(min(found["product"], found["sum"]) >= TRAINING["lookup_pass"]), world) > 0
        if rank == 0:
            log(f"after epoch {epoch}: the letter follows product work {found['product']:.1%}, sum work "
                f"{found['sum']:.1%} (needs {TRAINING['lookup_pass']:.0%})" + (
                    f": formed; now {TRAINING['anneal_epochs']} annealing pass(es), the learning rate falling to 0"
                    if formed else ""))
        if not formed and epoch == TRAINING["max_epochs"]:
            raise common.Abort(f"base build {seed}: the value-to-letter lookup had not formed after {epoch} epochs; "
                               f"nothing was written to {out}. Try another --base-seed.")
        return formed

    fit(policy, pairs, epochs=TRAINING["max_epochs"], batch=TRAINING["batch"], micro_batch=TRAINING["batch"],
        lr=TRAINING["lr"], warmup=TRAINING["warmup"], seed=seed, rank=rank, world=world, device=device, log=log,
        after_epoch=lookup_formed, anneal=TRAINING["anneal_epochs"])
    found = lookup(policy, tokenizer, device=device)
    common.export(policy, tokenizer, out, rank, world)
    if rank == 0:
        log(f"annealed: the letter follows product work {found['product']:.1%}, sum work {found['sum']:.1%}; its "
            f"mean probability {found['product_p']:.3f}, {found['sum_p']:.3f}")
        (out / "recipe.json").write_text(json.dumps(recipe(seed), indent=1))
        log(f"demo base model ready in {time.time() - t0:.0f} s")
    return out


@torch.no_grad()
def lookup(policy, tok, n: int = 400, seed: int = 99, device="cpu", form: str = "concise") -> dict:
    """Does the letter follow the written value? For n fresh questions, a worked solution in `form` (the product for
    half of them, the sum for the others) is fed up to its letter after "option", and the four letters are read:
    -> {"product": the share whose most likely letter is the option holding the product, "sum": holding the sum,
    "product_p", "sum_p": the mean probability of that letter, which is what sampling at T = 1 draws with}.
    A model that has not learned the lookup scores about a quarter on the shares."""
    hits, probs = {"product": [], "sum": []}, {"product": [], "sum": []}
    for i, q in enumerate(make_questions(n, seed)):
        text = data.build_prompt(q) + solution(q, correct=i % 2 == 0, form=form)
        at = list(re.finditer(r"[Oo]ption ", text))[-1].end()              # the letter's character
        ids = {k: tok.encode(text[:at] + k).ids for k in "ABCD"}           # the text, each letter in its place
        t = len(ids["A"]) - 1                                               # the letter's token
        p = policy(torch.tensor([ids["A"][:t]], device=device))[0, -1].float().softmax(-1)
        p = {k: p[ids[k][t]].item() for k in "ABCD"}
        kind = "product" if i % 2 == 0 else "sum"
        hits[kind].append(max(p, key=p.get) == text[at])
        probs[kind].append(p[text[at]])
    return {**{k: sum(v) / len(v) for k, v in hits.items()}, **{f"{k}_p": sum(v) / len(v) for k, v in probs.items()}}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("DIR", help="a base model folder: print its teacher-forced lookup (demo.lookup)")
    args = p.parse_args(argv)
    common.check_checkpoint(args.DIR)
    policy, tok = M.load_model(args.DIR, dtype=torch.float32), data.load_tokenizer(args.DIR)
    found = lookup(policy, tok)
    print(f"teacher-forced lookup: after product work the letter of the product {found['product']:.1%}, after sum "
          f"work the letter of the sum {found['sum']:.1%} (no lookup: ~25%; a build needs "
          f"{TRAINING['lookup_pass']:.0%}); its mean probability {found['product_p']:.3f} and {found['sum_p']:.3f}")
    # The gate probes the concise form only; a sampled response writes any of the forms whose work comes first
    worked = [f for f in FORMS if FORMS[f].index("{work}") < FORMS[f].index("{letter}")]
    per_form = {f: lookup(policy, tok, form=f) for f in worked}
    print("per form, after product / sum work: " + ", ".join(f"{f} {r['product']:.1%} / {r['sum']:.1%}"
                                                              for f, r in per_form.items()))
    print(f"sampled, does its reasoning pay: python evaluate.py --model {args.DIR} --dose 128 --samples 4 "
          "--max-new-tokens 40")
    return found

if __name__ == "__main__":
    common.cli(main)
