"""
Data for Med-RLVR: the Qwen2.5 tokenizer, the multiple-choice datasets, and the prompt.

- load_tokenizer / eos_token_id / decode: a plain `tokenizers.Tokenizer` read from a checkpoint's
  tokenizer.json. Qwen2.5 base uses "<|endoftext|>" (id 151643) as both EOS and pad.
- load_medqa / load_mmlu_pro: read the released files into a list of `Example`s with options lettered
  A, B, C, ... in order and the answer as a letter. MedQA is the jind11 JSON-lines release; MMLU-Pro is
  TIGER-Lab's release, as JSON lines or as .parquet (the latter needs pyarrow).
- build_prompt: the R1-Zero-style base-model prompt (think in <think></think>, answer with a letter in
  <answer></answer>), ending with the pre-filled "<think>".

Deliberate simplifications: everything is loaded eagerly into memory (the largest split is ~12k rows);
no chat template (Med-RLVR trains the *base* model on a plain-text prompt); a bad row is an error, never
silently skipped. The exact Med-RLVR prompt is not published verbatim, so PROMPT_TEMPLATE is the
DeepSeek-R1-Zero template (as in TinyZero / Logic-RL) adapted to multiple choice.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

PROMPT_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question}\n{options}\n"
    "Give the letter of the correct option inside <answer></answer>. Assistant: <think>"
)
# The prompt ends by pre-filling the opening "<think>", so the model's response *continues* the think
# block and never contains that tag itself. Callers prepend PROMPT_PREFILL to the response text before
# reward scoring, so the format check sees a complete "<think> ... </think> <answer> ... </answer>".
PROMPT_PREFILL = "<think>"
assert PROMPT_TEMPLATE.endswith(PROMPT_PREFILL)

EOS_TOKEN = "<|endoftext|>"  # Qwen2.5 base: end of document, also used as pad
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# -----------------------------------------------------------------------------
# tokenizer

def load_tokenizer(path) -> Tokenizer:
    """Load tokenizer.json from a checkpoint folder, or from the tokenizer.json file itself."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {file}")
    return Tokenizer.from_file(str(file))


def eos_token_id(tokenizer: Tokenizer) -> int:
    """Id of "<|endoftext|>" (151643 for Qwen2.5), the token that ends a base-model response."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token")
    return token_id


def decode(tokenizer: Tokenizer, ids, skip_special_tokens: bool = False) -> str:
    """Token ids -> text. Unlike `Tokenizer.decode`, special tokens are KEPT by default, so the reward
    function can see a "<|endoftext|>" (or an "<|im_start|>" the model should not have produced)."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


# -----------------------------------------------------------------------------
# datasets

@dataclass
class Example:
    question: str
    options: dict[str, str]  # "A" -> option text, letters contiguous from A, in order
    answer: str              # the correct letter, always a key of options
    category: str            # MedQA: meta_info (step1 / step2&3); MMLU-Pro: src (e.g. ori_mmlu-virology)


def _rows(path):
    """Yield (where, row) for every row of a .jsonl (or .parquet) file; `where` names file and line/row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only the .parquet release needs it
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i + 1}", row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue  # tolerate blank lines (e.g. a trailing one); line numbers stay physical
            where = f"{path} line {i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON: {e}") from None
            yield where, row


def _load(path, to_example) -> list[Example]:
    """Convert every row with `to_example`, turning any malformed row into one ValueError naming it."""
    examples = []
    for where, row in _rows(path):
        try:
            ex = to_example(row)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{where}: malformed row ({type(e).__name__}: {e})") from None
        if ex is None:
            continue  # filtered out by the caller
        if list(ex.options) != list(LETTERS[:len(ex.options)]):
            raise ValueError(f"{where}: option letters {list(ex.options)} are not A, B, C, ... in order")
        if ex.answer not in ex.options:
            raise ValueError(f"{where}: answer {ex.answer!r} is not one of the options {list(ex.options)}")
        examples.append(ex)
    return examples


def load_medqa(path) -> list[Example]:
    """MedQA-USMLE, jind11 JSON lines: question, options {"A": ..., "D": ...}, answer_idx (letter), meta_info."""
    def to_example(row):
        options = {k: str(v) for k, v in sorted(row["options"].items())}  # sort: key order is not promised
        return Example(str(row["question"]), options, row["answer_idx"], str(row.get("meta_info", "")))
    return _load(path, to_example)


def load_mmlu_pro(path, category: str | None = None) -> list[Example]:
    """MMLU-Pro, released fields: question, options (list of 3-10 strings), answer (letter), category, src.
    `category` keeps only rows of that category (e.g. "health": 818 of the 12,032 test rows)."""
    def to_example(row):
        if category is not None and row["category"] != category:
            return None
        # "N/A" pads some validation rows to 10 options (always at the end); the official MMLU-Pro
        # evaluation drops them too, so the letters of the real options do not change.
        options = [str(o) for o in row["options"] if o != "N/A"]
        # Trust `answer`, not `answer_index`: they disagree on one chemistry test row (question_id 3983).
        return Example(str(row["question"]), dict(zip(LETTERS, options)), row["answer"], str(row["src"]))
    return _load(path, to_example)


# -----------------------------------------------------------------------------
# prompt

def build_prompt(example: Example) -> str:
    """The text the base model continues: ends with PROMPT_PREFILL, options one per line as "A. text"."""
    options = "\n".join(f"{letter}. {text}" for letter, text in example.options.items())
    return PROMPT_TEMPLATE.format(question=example.question.strip(), options=options)
