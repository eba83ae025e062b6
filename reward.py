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
