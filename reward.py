"""
Rule-based reward for Med-RLVR: score one completion against the gold option letter.

`text` is the assistant's whole output from `<think>` to `</answer>` (when the prompt pre-fills `<think>`,
the caller prepends it). The rules, exactly:

Format. The text is valid when
  1. each of the tags <think>, </think>, <answer>, </answer> occurs exactly once, in that order (so no
     nested, repeated or stray tag anywhere, not even one quoted inside the think block), and
  2. everything outside the two blocks (before <think>, between </think> and <answer>, after </answer>)
     is whitespace and the end-of-text tokens <|endoftext|> and <|im_end|>.
  The blocks' contents are otherwise free; an empty think or answer block is still a valid format.

Answer. The answer block's content, stripped of whitespace, is readable when it starts with a label:
  - an uppercase letter A-J in brackets: "(C)", "[C]", or
  - a bare uppercase letter A-J that ends the content or is followed by ".", ":" or ")": "C", "C.", "C)",
and what follows the label (the option text: "C. Cross-linking of DNA", "C: text", "(C) text") does not
begin, after whitespace, "." and ":", with the word "or" / "and" (any case) or with ",", "/" or "&"
(hedges like "(A) or (C)", "C. or A"). Anything else is unreadable: empty, lowercase ("c"; a lowercase "a"
is ambiguous with the English article), prose ("The answer is C"), or several options run together
("A or C", "A, B, C, D", "A and B", "C/A", "CD").
Beyond that the option text is not inspected: real option texts include "E. coli infection" and "A and B",
so "D. E. coli infection" reads as D. Nor is it checked that the letter exists in this question (score
does not see the options): a letter other than the gold one is simply wrong.

Reward.
  +1.0               valid format and the label's letter is the gold letter
  incorrect_reward   valid format, but a wrong or unreadable answer (0.0 by default; -1.0 is the paper's ablation)
  -1.0               invalid format (this includes two answer blocks)

Behaviour labels (second half of the file): classify() names which of the paper's training stages one response
shows (format failure, reasoning outside the think block, direct answer, verbose, concise). They are a metric,
not a reward: train.py logs the direct-answer rate per step, evaluate.py tabulates the mix per step.

Everything is str.count / str.find / str.replace plus one anchored, non-nested regex that reads at most
3 characters, so the cost is linear in len(text): a megabyte of adversarial text scores in milliseconds.
"""

import re

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
END_TOKENS = ("<|endoftext|>", "<|im_end|>")
LETTERS = "ABCDEFGHIJ"
LABEL = re.compile(r"\(([A-J])\)|\[([A-J])\]|([A-J])(?:[.:)]|\Z)")  # used with .match: anchored, O(1)
INVALID = (False, None, "", "")


def _blank(s):
    """True when s holds only whitespace and end-of-text tokens."""
    for tok in END_TOKENS:
        s = s.replace(tok, " ")  # a space, not "", so the removal cannot glue two halves into a new token
    return not s.strip()


def read_letter(answer_text):
    """The option letter an answer block's content names, or None when it is unreadable (rules above)."""
    s = answer_text.strip()
    m = LABEL.match(s)
    if m is None:
        return None
    rest = s[m.end():].lstrip(".: \t\r\n")  # the option text, if any
    words = rest[:4].split()  # only the first 4 characters can hold "or " / "and "
    first_word = words[0].lower() if words else ""
    if first_word in ("or", "and") or rest.startswith((",", "/", "&")):
        return None  # "(A) or (C)": names a second option
    return m.group(m.lastindex)  # exactly one of the three groups matched


def parse(text):
    """(valid_format, letter, think, answer_text) of one completion. think and answer_text are the blocks'
    stripped contents; letter is None when the answer is unreadable. Invalid format: (False, None, "", "")."""
    if any(text.count(tag) != 1 for tag in TAGS):
        return INVALID  # missing, repeated or nested tags
    a, b, c, d = (text.find(tag) for tag in TAGS)
    if not a < b < c < d:
        return INVALID  # e.g. answer before think, or blocks interleaved
    b_end, d_end = b + len("</think>"), d + len("</answer>")
    if not (_blank(text[:a]) and _blank(text[b_end:c]) and _blank(text[d_end:])):
        return INVALID  # text outside the blocks
    think = text[a + len("<think>"):b].strip()
    answer_text = text[c + len("<answer>"):d].strip()
    return True, read_letter(answer_text), think, answer_text


def score(text, answer, incorrect_reward=0.0):
    """Reward of one completion `text` given the gold letter `answer` (rules in the module docstring)."""
    if not (isinstance(answer, str) and len(answer) == 1 and answer in LETTERS):
        raise ValueError(f"reward.score: gold answer must be one letter A-J, got {answer!r}")
    valid, letter, _, _ = parse(text)
    if not valid:
        return -1.0
    return 1.0 if letter == answer else float(incorrect_reward)


# -----------------------------------------------------------------------------
# behaviour labels: not a reward, a metric (train.py logs the direct-answer rate; evaluate.py tabulates them)
#
# Med-RLVR (arXiv 2502.19655) reports six stages while PPO trains the base model: format failure -> verbose
# formatter -> concise structurer -> direct answer hacker -> step-by-step exploit -> reintegrated reasoning.
# classify() gives a response one of five transparent, rule-based labels (stages 3 and 6 look alike in form,
# so both read "concise"; stage 5 is "reasoning_outside"), checked in this order, on words from str.split and
# with str.find / str.replace only: linear in the response length.
OUTSIDE_MIN_WORDS, ANSWER_MAX_WORDS, EMPTY_THINK_WORDS = 8, 8, 3
EARLY_WORDS, BARE_WORDS, VERBOSE_WORDS = 10, 3, 120
REASONING_OUTSIDE = "reasoning_outside"  # outside >=8 words, answer >=8 (less option), or think <3 & outside+answer >=8
FORMAT_FAILURE = "format_failure"  # reward.parse says invalid format (and not reasoning_outside)
DIRECT_ANSWER = "direct_answer"    # valid; think <= 3 words, or its first min(10, half) words name an option
VERBOSE = "verbose"                # valid; think > 120 words
CONCISE = "concise"                # valid; everything else
LABELS = (FORMAT_FAILURE, REASONING_OUTSIDE, DIRECT_ANSWER, VERBOSE, CONCISE)
CUE_WORDS = ("answer", "option", "choice", "is", "be")  # "answer is A", "Answer: C", "option B", "should be D"
PUNCT = ".,;:!?()[]*\"'"


def read_blocks(text):
    """(think words, answer text, outside words), read leniently so invalid responses can be read too: think
    runs from the first <think> (or the start) to the first </think> or <answer> after it (or the end), the
    answer from the next <answer> to the next </answer> (or the end); outside is the rest. Tags and end-of-text
    tokens become spaces (not "", so no two words get glued)."""
    a = text.find("<think>")
    t0 = a + len("<think>") if a >= 0 else 0
    t1 = min([i for i in (text.find("</think>", t0), text.find("<answer>", t0)) if i >= 0] or [len(text)])
    t2 = t1 + len("</think>") if text.startswith("</think>", t1) else t1
    c = text.find("<answer>", t2)
    c = len(text) if c < 0 else c  # no answer block: an empty one at the end
    d = text.find("</answer>", c)
    d = len(text) if d < 0 else d  # unclosed: it runs to the end
    parts = [text[t0:t1], text[c + len("<answer>"):d], text[:max(a, 0)] + text[t2:c] + text[d + len("</answer>"):]]
    for tok in TAGS + END_TOKENS:
        parts = [p.replace(tok, " ") for p in parts]
    return parts[0].split(), parts[1].strip(), parts[2].split()


def _norm(words):  # whole words, lowercase, no punctuation: " c cross-linking of dna "
    return " " + " ".join(w.strip(PUNCT).lower() for w in words) + " "


def _reveals(window, options):
    """True when the words `window` (the think block's first EARLY_WORDS) name an option:
    - "(C)" or "[C]" anywhere (letters A-J, "*" of markdown bold stripped);
    - "C", "C.", "C:", "C)", "C," right after a cue word (CUE_WORDS, any case, ":" ignored), or as the first
      word, where a bare "A" / "I" does not count (article, pronoun: "A 45-year-old man ...");
      "C." followed by a lowercase word is an abbreviation, not a cue ("C. difficile", "E. coli");
    - with options: an option's text, as whole words ignoring case and punctuation (PUNCT)."""
    for i, w in enumerate(window):
        w = w.strip("*")
        if len(w) == 3 and w[0] + w[2] in ("()", "[]") and w[1] in "ABCDEFGHIJ":
            return True
        if not (1 <= len(w) <= 2 and w[0] in "ABCDEFGHIJ" and w[1:] in ("", ".", ":", ")", ",")):
            continue
        if w[1:] == "." and i + 1 < len(window) and window[i + 1][:1].islower():
            continue  # "C. difficile"
        if (i > 0 and window[i - 1].lower().strip("*:") in CUE_WORDS) or (i == 0 and w not in ("A", "I")):
            return True
    return any(o.strip() and _norm(o.split()) in _norm(window) for o in (options or {}).values())


def classify(response: str, options: dict | None = None) -> str:
    """The behaviour label of one response (the text from <think> on); `options` maps letter -> option text."""
    think, answer, outside = read_blocks(response)
    n_think, n_answer, n_out = len(think), len(answer.split()), len(outside)
    option = (options or {}).get(read_letter(answer), "")
    if option.strip() and _norm(option.split()) in _norm(answer.split()):
        n_answer -= len(option.split())  # "C. Inhibition of ... synthesis" is the option, not reasoning
    if (n_out >= OUTSIDE_MIN_WORDS or n_answer >= ANSWER_MAX_WORDS
            or (n_think < EMPTY_THINK_WORDS and n_out + n_answer >= OUTSIDE_MIN_WORDS)):
        return REASONING_OUTSIDE
    if not parse(response)[0]:
        return FORMAT_FAILURE
    # early: within the first EARLY_WORDS words *and* the first half of the think block, so a short worked
    # solution that ends by naming its option ("9 * 7 = 63 mg, option A.") is reasoning, not the hack
    if n_think <= BARE_WORDS or _reveals(think[:min(EARLY_WORDS, n_think // 2)], options):
        return DIRECT_ANSWER  # before VERBOSE: a long think that opens with the answer is still the hack
    return VERBOSE if n_think > VERBOSE_WORDS else CONCISE


def direct_answer_rate(responses: list[str]) -> float:
    """Share of responses labelled direct_answer (a training metric: the 'direct answer hacker' stage)."""
    if not responses:
        raise ValueError("direct_answer_rate: no responses")
    return sum(classify(r) == DIRECT_ANSWER for r in responses) / len(responses)
