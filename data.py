"""
Data for Med-RLVR: the Qwen2.5 tokenizer, the multiple-choice datasets, and the prompt.

- load_tokenizer / eos_token_id / decode: a plain `tokenizers.Tokenizer` read from a checkpoint's
  tokenizer.json. Qwen2.5 base uses "<|endoftext|>" (id 151643) as both EOS and pad.
- load_questions (= load_medqa, load_mmlu_pro): read a released multiple-choice file into a list of
  `Example`s with options lettered A, B, C, ... in order and the answer as a letter, its schema found from
  its fields (SCHEMAS: MedQA as jind11 and GBaker released it, MedQA's -hf form, TIGER-Lab's MMLU-Pro),
  as JSON lines or as .parquet (the latter needs pyarrow).
- build_prompt: the R1-Zero-style base-model prompt (think in <think></think>, answer with a letter in
  <answer></answer>), ending with the pre-filled "<think>".
(The CPU demo's synthetic task, its corpus and its tokenizer live in demo.py.)

Deliberate simplifications: everything is loaded eagerly into memory (the largest split is ~12k rows);
no chat template (Med-RLVR trains the *base* model on a plain-text prompt); a bad row is an error, never
silently skipped. The exact Med-RLVR prompt is not published verbatim, so PROMPT_TEMPLATE is the
DeepSeek-R1-Zero template (as in TinyZero / Logic-RL) adapted to multiple choice.
"""
import functools
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
    tok = Tokenizer.from_file(str(file))
    tok.no_padding()             # a tokenizer.json may ask for either: ids are never padded or cut here (and
    tok.no_truncation()          # encode_batch's then equal encode's)
    return tok


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
    with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is reported on its own line
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # -sig: a byte-order mark is skipped
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {i + 1}: not UTF-8 ({e.reason} at byte {e.start} of the line); "
                                 "re-save the file as UTF-8") from None
            if not line.strip():
                continue  # tolerate blank lines (e.g. a trailing one); line numbers stay physical
            where = f"{path} line {i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON: {e}") from None
            yield where, row


def _medqa(row, category):
    """MedQA-USMLE as jind11 released it (4- and 5-option files) and GBaker's copy: question, options {"A": ...},
    answer_idx (a letter), answer (its text), meta_info. The letters differ between the 4- and 5-option files, so the
    answer text is checked against its letter: a row whose letter came from the other file is an error."""
    options = {k: str(v) for k, v in sorted(row["options"].items())}     # sort: key order is not promised
    if "answer" in row and options.get(row["answer_idx"]) != str(row["answer"]):
        raise ValueError(f"answer_idx {row['answer_idx']!r} is option {options.get(row['answer_idx'])!r}, but answer "
                         f"says {row['answer']!r} (the letter of another release: 4 vs 5 options?)")
    return Example(str(row["question"]), options, row["answer_idx"], str(row.get("meta_info", "")))


def _medqa_hf(row, category):
    """MedQA's -hf form (SWAG-style: sent1, ending0..ending3, an integer label)."""
    endings = [str(row[f"ending{i}"]) for i in range(10) if f"ending{i}" in row]
    question = " ".join(str(row[k]) for k in ("sent1", "sent2") if row.get(k))
    return Example(question, dict(zip(LETTERS, endings)), LETTERS[int(row["label"])], "")


def _mmlu_pro(row, category):
    """MMLU-Pro as TIGER-Lab released it: question, options (a list of 3-10 strings), answer (a letter), category,
    src; `category` keeps only its rows (e.g. "health": 818 of the 12,032 test rows)."""
    if category is not None and row["category"] != category:
        return None
    # "N/A" pads some validation rows to 10 options (always at the end); the official MMLU-Pro evaluation drops
    # them too, so the letters of the real options do not change.
    options = [str(o) for o in row["options"] if o != "N/A"]
    # Trust `answer`, not `answer_index`: they disagree on one chemistry test row (question_id 3983).
    return Example(str(row["question"]), dict(zip(LETTERS, options)), row["answer"], str(row.get("src", "")))


# The multiple-choice schemas we read, told apart by the fields of a file's first row (the first match wins).
SCHEMAS = [("MedQA (jind11, GBaker): question, options {letter: text}, answer_idx", {"question", "options",
                                                                                     "answer_idx"}, _medqa),
           ("MedQA -hf: sent1, ending0..ending3, label", {"sent1", "ending0", "label"}, _medqa_hf),
           ("MMLU-Pro: question, options [texts], answer, category", {"question", "options", "answer", "category"},
            _mmlu_pro)]


def load_questions(path, category: str | None = None) -> list[Example]:
    """A multiple-choice file (.jsonl, or .parquet with pyarrow) in any schema of SCHEMAS, found from its first row
    -> Examples with options lettered A, B, C, ... in order and the answer a letter. `category`: MMLU-Pro's rows of
    that category only. An unknown schema is one error naming the file, the fields found and the schemas known; a
    malformed row, one naming its line."""
    examples, convert = [], None
    for where, row in _rows(path):
        if convert is None:
            fields = set(row) if isinstance(row, dict) else set()
            convert = next((f for _, need, f in SCHEMAS if need <= fields), None)
            if convert is None:
                raise ValueError(f"{path}: unknown schema (fields {sorted(fields)}); known: "
                                 + "; ".join(name for name, _, _ in SCHEMAS))
        try:
            ex = convert(row, category)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            raise ValueError(f"{where}: malformed row ({type(e).__name__}: {e})") from None
        if ex is None:
            continue  # not of the asked category
        if not 2 <= len(ex.options) <= 10:
            raise ValueError(f"{where}: {len(ex.options)} options; 2 to 10 (A-J, the letters the reward reads) "
                             "are supported")
        if list(ex.options) != list(LETTERS[:len(ex.options)]):
            raise ValueError(f"{where}: option letters {list(ex.options)} are not A, B, C, ... in order")
        if ex.answer not in ex.options:
            raise ValueError(f"{where}: answer {ex.answer!r} is not one of the options {list(ex.options)}")
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no examples (an empty file, or none of the asked category)")
    return examples


load_medqa = load_questions          # the names the scripts use: MedQA's splits, MMLU-Pro's (health) rows
load_mmlu_pro = load_questions


# -----------------------------------------------------------------------------
# prompt

def build_prompt(example: Example) -> str:
    """The text the base model continues: ends with PROMPT_PREFILL, options one per line as "A. text"."""
    options = "\n".join(f"{letter}. {text}" for letter, text in example.options.items())
    return PROMPT_TEMPLATE.format(question=example.question.strip(), options=options)


def encode_prompts(tokenizer, examples: list[Example], max_len: int, what: str) -> list[list[int]]:
    """The prompts' ids; a prompt longer than max_len is an error naming `what` (never silently cut)."""
    ids = [list(p) for p in _encoded(tokenizer.to_str(), tuple(build_prompt(ex) for ex in examples))]
    too_long = [i for i, p in enumerate(ids) if len(p) > max_len]
    if too_long:
        raise ValueError(f"{what}: {len(too_long)} prompts exceed --max-prompt-len {max_len} "
                         f"(the first: example {too_long[0] + 1})")
    return ids


@functools.lru_cache(maxsize=4)   # once a process: bench.py and the tests run train.main many times on the same set
def _encoded(tokenizer_json: str, prompts: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    encodings = Tokenizer.from_str(tokenizer_json).encode_batch(list(prompts))     # batched: 2x faster
    return tuple(tuple(e.ids) for e in encodings)


def tokenize_pairs(tokenizer, texts: list[tuple[str, str]], max_len: int):
    """Text pairs -> id pairs; a pair longer than max_len is an error naming it (never silently cut)."""
    prompts = tokenizer.encode_batch([prompt for prompt, _ in texts])      # batched: the same ids, 2x faster
    responses = tokenizer.encode_batch([response for _, response in texts])
    pairs = []
    for i, (p, r) in enumerate(zip((e.ids for e in prompts), (e.ids for e in responses))):
        if len(p) + len(r) > max_len:
            raise ValueError(f"example {i}: {len(p) + len(r)} tokens > --max-len {max_len}")
        pairs.append((p, r))
    return pairs
