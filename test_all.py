"""
The test suite. Every test checks real behaviour against an independent reference: transformers' Qwen2 for the
model and the sampler, naive loops and hand computations for the PPO math and the reward, the released files and
llama.cpp's tokenizer vectors for the data, one process for FSDP, an uninterrupted run for resume. Tests that need
../shared (real data, the Qwen2.5 tokenizer) skip with a message when it is absent (a fresh clone).

    python -m pytest -q test_all.py

Layout: constants and fixtures first, then one block per source file in the README's reading order (each test's
name starts with the file it tests), helpers at the bottom.
    test_layout_*     the files themselves: model / rollout / ppo / reward copy out alone; every flag has a help
    test_model_*      model.py against transformers: logits, padding, KV cache, checkpointing, safetensors in/out
    test_rollout_*    rollout.py: greedy = transformers' generate, cached = uncached, log-probs, top-p
    test_reward_*     reward.py: the format and answer rules, linear time, the behaviour classifier
    test_ppo_*        ppo.py: masked statistics, KL, token rewards, GAE, policy and value losses, OpenRLHF 0.5.9
    test_train_*      train.py with recipe.py, checkpoint.py and memory.py: FSDP with 2 ranks = 1 process, resume =
                      uninterrupted, bad input, the memory plan against a real step, PPO learns
    test_common_*     common.py: processes, hub ids
    test_data_*       data.py: MedQA / MMLU-Pro files, bad rows, the prompt, the tokenizer
    test_demo_*       demo.py: balanced letters, the families, the rules, the corpus, the tokenizer, the shipped base
    test_sft_*        sft.py: the response-only loss, learning, the HF export
    test_evaluate_*   evaluate.py and study.py: scoring by the reward rules, pass@k, the stages, runs compared
    test_gpu_report_* gpu_report.py (bench.py --device): the GPU report in miniature on the CPU

This file is also the worker of the suite's two background launches (the two_ranks and one_rank fixtures): `python
test_all.py JOBS.json` runs the jobs of several tests one after another in the same processes (_run_jobs): 2 ranks
under torchrun, or one process.
"""
import hashlib
import importlib.util
import json
import math
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")   # the suite is CPU-only (fp32 defaults, gloo), also on a GPU node
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep, not spin: the 2-rank launch shares the cores
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import bench
import checkpoint
import common
import data
import demo
import evaluate
import gpu_report
import memory
import model
import ppo
import recipe
import rollout
import sft
import study
import train
from study import dynamics_table, format_table, plot_dynamics, read_samples
from reward import (CONCISE, DIRECT_ANSWER, FORMAT_FAILURE, LABELS, REASONING_OUTSIDE, VERBOSE, classify,
                    direct_answer_rate, parse, read_letter, score)

ROOT = Path(__file__).resolve().parent
SHARED = Path(__file__).resolve().parent.parent / "shared"
MEDQA = SHARED / "data" / "medqa"
MMLU_PRO = SHARED / "data" / "mmlu_pro"
QWEN = SHARED / "tokenizers" / "qwen2.5"


STANDALONE_USE = {   # the smallest use of each file, run with nothing but that file in the folder
    "model.py": """
import torch, model
cfg = model.Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
net = model.init_model(cfg)
model.save_model(net, "ckpt")
again = model.load_model("ckpt", device="cpu")
x = torch.tensor([[1, 2, 3]])
assert again(x).shape == (1, 3, 11) and torch.allclose(again(x), net(x))
""",
    "rollout.py": """
import torch, types, rollout
class Bigram(torch.nn.Module):     # the two things rollout needs of a model: .config and .lm_head, and the cache
    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, hidden_size=4,
                                            num_attention_heads=1)
        self.lm_head = torch.nn.Linear(4, 5, bias=False)
        self.embed = torch.nn.Embedding(5, 4)
    def forward(self, ids, attention_mask=None, kv_cache=None, logits_from=0):
        kv_cache.update(0, *(torch.zeros(ids.shape[0], 1, ids.shape[1], 4),) * 2)
        kv_cache.length += ids.shape[1]
        return self.lm_head(self.embed(ids))[:, logits_from:]
out = rollout.generate(Bigram(), [[1, 2], [3]], 6, temperature=1.0, eos_token_id=4,
                       generator=torch.Generator().manual_seed(0))
assert len(out.responses) == 2 and all(1 <= len(r) <= 6 for r in out.responses)
assert all(len(lp) == len(r) for lp, r in zip(out.logprobs, out.responses))
""",
    "ppo.py": """
import torch, ppo
mask = torch.tensor([[1.0, 1.0, 0.0]])
rewards = ppo.token_rewards(torch.tensor([1.0]), torch.zeros(1, 3), mask, 0.1)
adv, ret = ppo.compute_gae(rewards, torch.zeros(1, 3), mask, 1.0, 1.0)
assert adv.tolist() == [[1.0, 1.0, 0.0]]
""",
    "reward.py": """
import reward
assert reward.score("<think> 2 * 3 = 6 </think><answer>C</answer>", "C") == 1.0
assert reward.score("no tags", "C") == -1.0
assert reward.classify("<think> </think><answer>C</answer>") == reward.DIRECT_ANSWER
""",
}


# ================================================================================================================
# shared across the files: constants and fixtures (helpers are at the bottom)
# ================================================================================================================

CONFIGS = {  # tied, heads, kv_heads (head ratio 1, 2, 7), sharded, legacy config.json spelling
    "tied-mha-single-v5": dict(tied=True, heads=4, kv_heads=4),
    "untied-gqa2-sharded-legacy": dict(tied=False, heads=4, kv_heads=2, sharded=True, legacy_config=True),
    "tied-gqa7-sharded-v5": dict(tied=True, heads=7, kv_heads=1, sharded=True),
    "untied-gqa7-single-legacy": dict(tied=False, heads=14, kv_heads=2, hidden=112, legacy_config=True),
}


def W(ans, think="The drug blocks cell wall synthesis."):
    """A well-formed completion with the given answer-block content."""
    return f"<think>{think}</think>\n<answer>{ans}</answer>"


# (text, valid_format, letter, score with gold "C" and the default incorrect_reward=0.0)
CASES = [
    # readable answers
    (W("C"), True, "C", 1.0),
    (W("B"), True, "B", 0.0),
    (W("J"), True, "J", 0.0),
    (W("(C)"), True, "C", 1.0),
    (W("[C]"), True, "C", 1.0),
    (W("C."), True, "C", 1.0),
    (W("C)"), True, "C", 1.0),
    (W("C. Cross-linking of DNA"), True, "C", 1.0),
    (W("C: Cross-linking of DNA"), True, "C", 1.0),
    (W("C) Cross-linking of DNA"), True, "C", 1.0),
    (W("(C) Cross-linking of DNA"), True, "C", 1.0),
    (W("C.Cross-linking"), True, "C", 1.0),
    (W("A. Gentamicin"), True, "A", 0.0),
    (W("  \n C \n"), True, "C", 1.0),
    (W("C. A and B"), True, "C", 1.0),  # a real option text, not a hedge
    (W("C. E. coli infection"), True, "C", 1.0),  # option text is not inspected
    (W("D. E. coli infection"), True, "D", 0.0),
    (W("C. Oral amoxicillin or doxycycline"), True, "C", 1.0),  # "or" later in the text is fine
    (W("C. Orange discharge"), True, "C", 1.0),  # starts with "Or", but the word is not "or"
    # unreadable answers: valid format, letter None
    (W(""), True, None, 0.0),
    (W("   \n "), True, None, 0.0),
    (W("c"), True, None, 0.0),
    (W("(c)"), True, None, 0.0),
    (W("K"), True, None, 0.0),
    (W("( C )"), True, None, 0.0),
    (W("(C"), True, None, 0.0),
    (W("CD"), True, None, 0.0),
    (W("C/A"), True, None, 0.0),
    (W("C - Cross-linking"), True, None, 0.0),
    (W("A or C"), True, None, 0.0),
    (W("C or A"), True, None, 0.0),  # a hedge never earns +1, even with the gold letter first
    (W("A, B, C, D"), True, None, 0.0),
    (W("C, A"), True, None, 0.0),
    (W("A and B"), True, None, 0.0),
    (W("C and A"), True, None, 0.0),
    (W("(C) or (A)"), True, None, 0.0),
    (W("(C) OR (A)"), True, None, 0.0),
    (W("(C), (A)"), True, None, 0.0),
    (W("(C)/(A)"), True, None, 0.0),
    (W("(C) & (A)"), True, None, 0.0),
    (W("C. or A."), True, None, 0.0),
    (W("C: and D"), True, None, 0.0),
    (W("The answer is C"), True, None, 0.0),
    (W("Answer: C"), True, None, 0.0),
    # format edge cases that stay valid
    (W("C", think=""), True, "C", 1.0),
    ("<think>x</think><answer>C</answer>", True, "C", 1.0),
    ("<think>x</think><answer>C</answer><|endoftext|>", True, "C", 1.0),
    ("<think>x</think><answer>C</answer><|im_end|>", True, "C", 1.0),
    ("<think>x</think><answer>C</answer>\n<|im_end|>\n<|endoftext|>\n", True, "C", 1.0),
    ("  \n<think>x</think>\n\n<answer>C</answer>\n\n", True, "C", 1.0),
    ("<think>x</think><|im_end|><answer>C</answer>", True, "C", 1.0),
    ("<think>a <|endoftext|> b</think><answer>C</answer>", True, "C", 1.0),  # inside a block: free text
    ("<think>x</think><answer>B</answer><|endoftext|>", True, "B", 0.0),
    # invalid format
    (W("C") + " So the answer is C.", False, None, -1.0),
    ("Sure. " + W("C"), False, None, -1.0),
    ("<think>x</think> so <answer>C</answer>", False, None, -1.0),
    ("<answer>C</answer>", False, None, -1.0),
    ("<think>C</think>", False, None, -1.0),
    ("C", False, None, -1.0),
    ("", False, None, -1.0),
    ("<answer>C</answer><think>x</think>", False, None, -1.0),
    ("<think>a</think><think>b</think><answer>C</answer>", False, None, -1.0),
    ("<think>x</think><answer>C</answer><answer>C</answer>", False, None, -1.0),
    ("<think>x</think><answer>A</answer><answer>C</answer>", False, None, -1.0),
    ("<think>a<think>b</think>c</think><answer>C</answer>", False, None, -1.0),
    ("<think>x</think><answer><answer>C</answer></answer>", False, None, -1.0),
    ("<think>I will write <answer>C</answer></think><answer>C</answer>", False, None, -1.0),
    ("<think>x</think><answer>C<think></answer>", False, None, -1.0),
    ("<think>x<answer>C</answer>", False, None, -1.0),
    ("<think>x</think><answer>C", False, None, -1.0),
    ("<think>x<answer>C</think></answer>", False, None, -1.0),
    ("</think>x<think><answer>C</answer>", False, None, -1.0),
    ("<THINK>x</THINK><ANSWER>C</ANSWER>", False, None, -1.0),
    (W("C") + "<|endoftext|>junk", False, None, -1.0),
    (W("C") + "<|endoftext", False, None, -1.0),
    (W("C") + "<|endo<|im_end|>ftext|>", False, None, -1.0),  # removing a token must not glue a new one
    (W("C") + "<|im_<|endoftext|>end|>", False, None, -1.0),
]


ADVERSARIAL = [  # ~1 MB each, with the outcome for gold "C" worked out by hand
    ("<think>" * 150_000, -1.0),
    ("<think>" + "<answer>" * 120_000, -1.0),
    ("<think>" + "</think" * 150_000 + "</think><answer>C</answer>", 1.0),
    ("<think>" + "<" * 1_000_000 + "</think><answer>C</answer>", 1.0),
    ("<think>x</think><answer>" + "A " * 500_000 + "</answer>", 0.0),
    ("<think>x</think><answer>" + "C" * 1_000_000 + "</answer>", 0.0),
    ("<think>x</think><answer>C. " + "or " * 300_000 + "</answer>", 0.0),
    ("<think>x</think><answer>C. Drug" + " or" * 300_000 + "</answer>", 1.0),
    ("<think>x</think><answer>(C)" + " " * 1_000_000 + "or (A)</answer>", 0.0),
    ("<think>x</think><answer>(C)" + "." * 1_000_000 + "</answer>", 1.0),
    ("<think>x</think><answer>C</answer>" + "<|endoftext|>" * 80_000, 1.0),
    ("<think>x</think><answer>C</answer>" + "<|endoftext" * 90_000, -1.0),
    ("\n" * 1_000_000 + "<think>x</think>" + " " * 1_000_000 + "<answer>C</answer>", 1.0),
]


MEDQA_ROW = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer": "b",
             "answer_idx": "B", "meta_info": "step1"}


MMLU_ROW = {"question_id": 1, "question": "Q?", "options": ["a", "b", "c"], "answer": "C", "answer_index": 2,
            "category": "health", "src": "ori_mmlu-x"}


GARBAGE = 123.0  # written into padding; every function must ignore it


END = "<|endoftext|>"


MEASLES = {"A": "Rubella", "B": "Roseola", "C": "Measles", "D": "Scarlet fever"}


LONG_OPTION = {"A": "Penicillin binding", "C": "Inhibition of bacterial cell wall synthesis by binding D-Ala-D-Ala"}


def r(think, answer="C", between="\n", after=END):
    """A response as samples.jsonl stores it: the pre-filled <think> is already prepended."""
    return f"<think>{think}</think>{between}<answer>{answer}</answer>{after}"


SENTENCE = "The patient has fever and rash. "  # 6 words, no option letter in it


# (response, options, expected label, why: the hand computation)
CLASSIFY_CASES = [
    # reasoning_outside
    (r("Short.", between="\nThe patient has fever and a rash, so step by step we conclude\n"), None,
     REASONING_OUTSIDE, "13 words between </think> and <answer> (>= 8)"),
    (r("Let me reason about this case.", "C because the patient has fever, rash and joint pain"), None,
     REASONING_OUTSIDE, "valid format, but 10 words in the answer block (>= 8)"),
    (r("", "C because of rash", between="\nStep 1: fever. Step 2: rash.\n"), None,
     REASONING_OUTSIDE, "think 0 words (< 3); 6 outside + 4 in answer = 10 (>= 8), each alone < 8"),
    (r("Penicillins act here.", "C. Inhibition of bacterial cell wall synthesis by binding D-Ala-D-Ala"), None,
     REASONING_OUTSIDE, "10 answer words (>= 8), no options to discount"),
    ("<think>ok</think>\n<answer>C</answer>\nExplanation: the fever, rash and cough all point to measles.", None,
     REASONING_OUTSIDE, "think 1 word; 10 words after </answer>"),
    # format_failure
    ("<think>The patient has fever and rash, pointing to measles.</think>\n<answer>C" + END, None,
     FORMAT_FAILURE, "missing </answer>: invalid; answer 'C' is 1 word, nothing outside"),
    ("<think>The patient has fever", None, FORMAT_FAILURE, "truncated: no </think>; 4 think words, nothing else"),
    (r("Fever and rash suggest measles.", "C</answer><answer>D"), None,
     FORMAT_FAILURE, "two answer blocks: invalid; the second one is 1 word outside"),
    (r("We weigh the options carefully.", between=" one two three four five six seven "), None,
     FORMAT_FAILURE, "7 words outside (< 8) and think has 5 words (>= 3): not reasoning_outside"),
    # direct_answer
    (r("C"), None, DIRECT_ANSWER, "bare: think is 1 word (<= 3)"),
    (r(""), None, DIRECT_ANSWER, "empty think: 0 words (<= 3)"),
    (r("Koplik spots, measles."), None, DIRECT_ANSWER, "3 think words (<= 3)"),
    (r("The answer is C. The patient has fever, rash and cough, which fits measles well."), None,
     DIRECT_ANSWER, "'C.' is word 4, after the cue word 'is'"),
    (r("The child with fever, rash and cough: answer is C. Measles fits the fever, the rash and the dry cough."),
     None, DIRECT_ANSWER, "'C.' is word 10 (the last early word) of 20, after 'is'"),
    (r("The child with fever, rash and cough: answer is C. Measles fits."), None,
     CONCISE, "'C.' is word 10 of 12: past the first half of the think block, so not early"),
    (r(" 9 * 7 = 63 mg, option A."), None, CONCISE, "the demo's worked solution: 'A.' is word 8 of 8, not early"),
    (r("C. Measles fits the fever and rash in this child best."), None, DIRECT_ANSWER, "'C.' is the first word"),
    (r("Looking at this, (B) seems right because of the fever pattern."), None, DIRECT_ANSWER, "'(B)' is word 4"),
    (r("Answer: A. Rubella gives a milder rash than the one described here."), None,
     DIRECT_ANSWER, "'A.' after the cue 'Answer:' (a bare first-word 'A' would not count)"),
    (r("Measles explains the fever, rash and cough in this unvaccinated child."), MEASLES,
     DIRECT_ANSWER, "option C's text 'Measles' is word 1"),
    (r("The answer is C. " + SENTENCE * 30), None, DIRECT_ANSWER, "184 think words, but 'C' early: before verbose"),
    # verbose
    (r(SENTENCE * 25), None, VERBOSE, "150 think words (> 120), no letter, no option"),
    (r(SENTENCE * 20 + "Measles."), None, VERBOSE, "121 think words (> 120)"),
    (r(SENTENCE * 25 + "So the answer is C."), MEASLES, VERBOSE, "letter at word 155, not early; no option text early"),
    # concise
    (r(SENTENCE * 20), None, CONCISE, "120 think words: not > 120"),
    (r("Fever, rash, cough and Koplik spots point to measles, which is option C."), None,
     CONCISE, "'C.' is word 13: late"),
    (r("The child with fever, rash, and bad cough: answer is C. Measles fits."), None,
     CONCISE, "'C.' is word 11: one past the early window"),
    (r("Koplik spots mean measles."), None, CONCISE, "4 think words: not bare, no letter"),
    (r("Measles explains the fever, rash and cough in this unvaccinated child."), None,
     CONCISE, "same as the option case, but without options nothing names an option"),
    (r("A 5-year-old boy has fever and rash after travel abroad recently."), None,
     CONCISE, "first word 'A' is the article, not a cue"),
    (r("C. difficile colitis follows antibiotics; here the rash fits measles instead."), None,
     CONCISE, "'C.' followed by lowercase 'difficile' is an abbreviation"),
    (r("Hepatitis B is unlikely since the rash and cough fit measles better."), None,
     CONCISE, "bare 'B' after 'Hepatitis', not a cue word"),
]


# samples.jsonl fixture: (step, response, score, hand label, think words by hand)
ROWS = [
    (1, "<think>fever and rash</think>\n<answer>C" + END, -1.0, FORMAT_FAILURE, 3),
    (1, "<think>the patient is", -1.0, FORMAT_FAILURE, 3),
    (1, r("the patient has fever and rash " * 21), 0.0, VERBOSE, 126),
    (2, r("Koplik spots mean measles here."), 1.0, CONCISE, 5),
    (2, r("Fever and rash suggest a viral illness.", "B"), 0.0, CONCISE, 7),
    (2, r("C"), 1.0, DIRECT_ANSWER, 1),
    (3, r("ok", between="\nStep 1: fever. Step 2: rash. Step 3: measles.\n"), -1.0, REASONING_OUTSIDE, 1),
    (3, r("The answer is C since measles fits the fever and the rash."), 1.0, DIRECT_ANSWER, 12),
]


HUGE = {  # 1 MB adversarial responses, built on demand
    "long think": lambda: r("word " * 200_000),
    "no spaces": lambda: "<think>" + "x" * 1_000_000,
    "tag fragments": lambda: "<think" * 170_000 + "</answer" * 10,
    "letters": lambda: r("(C " * 340_000),
    "outside": lambda: r("fine", between="C. " * 340_000),
    "answer": lambda: r("a b c d", "C. " + "y" * 1_000_000),
}


ESTIMATOR_ARGV = {"gae": [], "grpo": ["--advantage", "grpo", "--samples-per-prompt", "2", "--cuda-graphs",
                                      "on", "--loss-agg", "fixed"],
                  "rloo": ["--advantage", "rloo", "--samples-per-prompt", "4", "--kl-in", "loss", "--kl-estimator", "k2"],
                  "reinforce++": ["--advantage", "reinforce++", "--gamma", "0.99", "--rollout-chunk", "3",
                                  "--eval-every", "2"],       # an evaluation at the checkpoint's step, redone
                  # the GPU's precision on a CPU: bf16 compute, fp32 masters, bf16 reference, the chunked head in bf16;
                  # the one-GPU recipe's offload (masters, gradients and AdamW in host memory, a CPU step); and the
                  # preset's activation checkpointing (each block recomputed in backward), all under FSDP2
                  "gae-bf16-offload": ["--precision", "bf16", "--offload", "--grad-checkpoint"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, reference) of one small untied GQA checkpoint shared by the rollout tests."""
    path = tmp_path_factory.mktemp("tiny")
    return path, make_checkpoint(path, tied=False, heads=4, kv_heads=2, layers=2, vocab=61)


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    with open(path, "w") as f:
        for step, response, value, _, _ in ROWS:
            f.write(json.dumps({"step": step, "question": "Q?", "answer": "C", "response": response,
                                "score": value}) + "\n")
        f.write("\n")  # a trailing blank line is tolerated
    return path


@pytest.fixture(scope="session")
def taught_base(tmp_path_factory):
    """The demo's base in miniature: a tiny model fine-tuned for a moment on worked dose calculations, most of
    them adding where they should multiply. Its responses earn different rewards, which critic-free estimators
    need (a random model's are all -1, so every group baseline cancels every score)."""
    path = tmp_path_factory.mktemp("taught") / "base"
    questions = demo.make_questions(1024, seed=1)
    rng = random.Random(0)
    texts = [(data.build_prompt(q), demo.solution(q, correct=rng.random() < 0.4)) for q in questions]
    tok = demo.train_tokenizer([p + r for p, r in texts])
    config = model.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=192,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True, torch_dtype="float32")
    net = model.init_model(config)
    sft.train(net, data.tokenize_pairs(tok, texts, 512), epochs=1, batch=16, micro_batch=16, lr=3e-3, warmup=5,
              log=lambda msg: None)
    model.save_model(net, path)
    tok.save(str(path / "tokenizer.json"))
    return path


FSDP_KINDS = ("ppo", "sft", "rollout")                  # _worker's steps, one process against two
TWO_RANK_RESUMES = ("gae-bf16-offload", "grpo")         # the resume test's configurations under torchrun
ONE_RANK_RESUMES = ("gae", "grpo", "rloo", "reinforce++")   # ... and in one process
# the learning test: the demo with its settings on half its rollout batch, 6 steps
PPO_RAISES_ARGV = ["--steps", "8", "--rollout-batch", "32", "--train-batch", "16", "--micro-batch", "16",
                   "--eval-limit", "8", "--save-every", "0", "--sample-every", "0"]


@pytest.fixture(scope="session", autouse=True)
def start_early(request):
    """The background launches the selected tests need start with the session and run beside the tests that run in
    pytest's process (they leave a core idle much of the time), instead of after them."""
    for name, launch in (("two_ranks", "two_ranks_launch"), ("one_rank", "one_rank")):
        if any(name in item.fixturenames for item in request.session.items):
            request.getfixturevalue(launch)


@pytest.fixture(scope="session")
def two_ranks_launch(tmp_path_factory, taught_base):
    """The suite's 2-rank work, in one torchrun launch: starting two processes that import torch (and torch._dynamo,
    with the first optimizer) costs ~7 s on 2 cores, more than most of these jobs, so they run one after another in
    the same two processes (as bench.py runs train.main several times) and each test checks its own job's files.
    Started, not waited for (two_ranks waits). -> (folder, the hub test's paths, the launch). In the folder:
        fsdp/{ppo,sft,rollout}.safetensors   _worker's step on fsdp/m                  test_train_fsdp_*
        resume-{gae-bf16-offload,grpo}/      the straight, first half and resumed runs   test_train_resume_*
        hub/run                              train.py on hub ids, offline from hub/hf    test_common_*hub*
        evaluate/two.json                    evaluate.py on evaluate/m                   test_evaluate_under_torchrun_*
        sigterm/run                          train.py, rank 1 sent SIGTERM mid-run (last)  test_train_sigterm_*"""
    root = tmp_path_factory.mktemp("two_ranks")
    make_checkpoint(root / "fsdp" / "m", tied=True, heads=4, kv_heads=2, layers=2)
    jobs = [["worker", k, str(root / "fsdp" / "m"), str(root / "fsdp" / f"{k}.safetensors")] for k in FSDP_KINDS]
    for advantage in TWO_RANK_RESUMES:
        jobs += _resume_jobs(taught_base, root / f"resume-{advantage}", advantage)
    hub = _hub_setup(root / "hub")
    jobs.append(["train", *hub["argv"], "--out", str(root / "hub" / "run")])
    make_demo_like_checkpoint(root / "evaluate" / "m")
    jobs.append(["evaluate", *_evaluate_argv(root / "evaluate" / "m"), "--out", str(root / "evaluate" / "two.json")])
    make_demo_like_checkpoint(root / "sigterm" / "base")         # last: the signal ends the launch's last run
    jobs.append(["sigterm", *_ppo_argv(root / "sigterm" / "base", root / "sigterm" / "run", 400, "--save-every", "1000",
                                       "--eval-limit", "2")])
    launch = _launch(root, jobs, torchrun=True, env=hub["env"])
    yield root, hub, launch
    launch.kill()                                    # (ended long before, unless a test failed while it ran)
    launch.wait()


@pytest.fixture(scope="session")
def two_ranks(two_ranks_launch):
    """The 2-rank launch, finished: -> {"root": its folder, "hub": the hub test's paths}."""
    root, hub, launch = two_ranks_launch
    _finished(root, launch)
    return {"root": root, "hub": hub}


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory, taught_base):
    """The longest one-process runs, in a process of their own beside pytest's (the 2 cores share three streams of
    work instead of two): the learning test's run, the resume test's runs for each estimator, and last the GPU report
    in miniature. Started, not waited for: each test waits for its own files (_await). -> (folder, the launch):
        ppo/                                 the demo's settings, 6 steps              test_train_ppo_raises_*
        resume-{gae,grpo,rloo,reinforce++}/  the straight, first half and resumed runs   test_train_resume_*
        gpu.json                             bench.py --device cpu --tiny              test_gpu_report_runs_*"""
    root = tmp_path_factory.mktemp("one_rank")
    jobs = [["train", *PPO_RAISES_ARGV, "--out", str(root / "ppo")]]
    for advantage in ONE_RANK_RESUMES:
        jobs += _resume_jobs(taught_base, root / f"resume-{advantage}", advantage)
    jobs.append(["bench", "--device", "cpu", "--tiny", "--report", str(root / "gpu.json")])   # last: it ends the
    launch = _launch(root, jobs, torchrun=False)                                              # process group
    yield root, launch
    launch.kill()
    launch.wait()


# ================================================================================================================
# the layout: the four core files copy out alone; every flag of every script explains itself
# ================================================================================================================

@pytest.fixture(scope="module")
def copied_out(tmp_path_factory):
    """Each core file copied alone into a folder of its own and used there, all in one fresh interpreter (one torch
    import, not four), with the project's modules forgotten between them. -> {name: (folder, traceback or "")}"""
    root = tmp_path_factory.mktemp("copied_out")
    jobs = []
    for name, use in STANDALONE_USE.items():
        (root / name[:-3]).mkdir()
        shutil.copy(ROOT / name, root / name[:-3] / name)
        jobs.append((name, str(root / name[:-3]), use))
    script = f"""
import json, os, sys, traceback
errors = {{}}
for name, folder, use in {jobs!r}:
    os.chdir(folder)
    sys.path[0] = folder
    for module in {[n[:-3] for n in STANDALONE_USE]!r}:
        sys.modules.pop(module, None)
    try:
        exec(use, {{}})
        errors[name] = ""
    except BaseException:
        errors[name] = traceback.format_exc()
print(json.dumps(errors))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    errors = json.loads(r.stdout.splitlines()[-1])
    return {name: (root / name[:-3], errors[name]) for name in STANDALONE_USE}


@pytest.mark.parametrize("name", list(STANDALONE_USE))
def test_layout_core_file_copies_out_alone(copied_out, name):
    """model.py, rollout.py, ppo.py and reward.py import nothing from the project: each works alone."""
    folder, error = copied_out[name]
    assert not error, error[-2000:]
    assert sorted(p.name for p in folder.glob("*.py")) == [name]          # nothing else was there to import


@pytest.mark.parametrize("script", [recipe, sft, evaluate, bench], ids=lambda m: m.__name__)  # recipe: train.py's
def test_layout_every_flag_has_help_and_shows_its_default(script):
    parser = script.make_parser()
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{script.__name__} {action.option_strings[0]}: no help"
        if action.default is not None:
            unwrapped = " ".join(text.split()).replace("- ", "-")             # argparse wraps at hyphens too
            assert f"(default: {action.default})" in unwrapped, action.option_strings[0]
    enumerations = {"recipe": ("--kl-estimator", "--loss-agg", "--preset"), "evaluate": ("--prompt",)}
    for flag in enumerations.get(script.__name__, ()):                          # are argparse choices
        for action in parser._actions:
            if flag in action.option_strings:
                assert action.choices, flag


# ================================================================================================================
# model.py against transformers' Qwen2ForCausalLM (the reference)
# ================================================================================================================

@pytest.mark.parametrize("name", CONFIGS)
def test_model_logits_equal_transformers(tmp_path, name):
    ref = make_checkpoint(tmp_path, **CONFIGS[name])
    if CONFIGS[name].get("sharded"):
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = model.load_model(tmp_path)
    assert next(ours.parameters()).dtype == torch.float32           # fp32 on CPU by default
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == CONFIGS[name].get("tied", True)
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max() <= 1e-4


def test_model_left_padding_and_kv_cache(tiny):
    """A left-padded row gives the logits its prompt gives alone; prefill + cached steps equal one forward."""
    path, ref = tiny
    ours = model.load_model(path)
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4], [8, 1, 6, 60]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        for i, p in enumerate(prompts):
            alone = ref(torch.tensor([p])).logits[0]
            assert (logits[i, T - len(p):] - alone).abs().max() <= 1e-4
        # the same batch fed through the static cache in pieces of 4, 1 and 2 tokens
        more = torch.randint(0, 61, (3, 3))
        full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
        full = ours(full_ids, attention_mask=full_mask)
        cache = rollout.KVCache(ours.config, 3, T + 3, "cpu", torch.float32)
        pieces = []
        for a, b in [(0, 4), (4, 5), (5, T + 3)]:
            pieces.append(ours(full_ids[:, a:b], attention_mask=full_mask[:, :b], kv_cache=cache))
        cached = torch.cat(pieces, 1)
        assert ((cached - full).abs() * full_mask[..., None]).max() <= 1e-4
        # no query row is fully masked (a pad query sees itself): an all-masked softmax row is NaN on some backends
        assert model.positions_and_mask(full_mask, T + 3, 0)[1].any(-1).all()
        logits, hidden = ours(ids, return_hidden=True)
        assert torch.allclose(ours.lm_head(hidden), logits)
        assert (hidden - ref(ids, output_hidden_states=True).hidden_states[-1]).abs().max() <= 1e-4


def test_model_gradient_checkpointing_gives_the_same_gradients(tiny):
    ours = model.load_model(tiny[0]).train()
    x = torch.randint(0, 61, (2, 9))
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.model.gradient_checkpointing = flag
        ours(x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_model_chunked_head_logprobs_equal_full_logits_and_gradients(tmp_path, tied, monkeypatch):
    """logprobs_of (the LM head a few positions at a time, recomputed in backward) against the plain path, the
    full [B, T, V] logits through ppo.logprobs_from_logits / entropy_from_logits: values and every gradient."""
    make_checkpoint(tmp_path / "m", tied=tied)
    net = model.load_model(tmp_path / "m").train()
    monkeypatch.setattr(model, "HEAD_CHUNK_BYTES", 3 * 4 * net.config.vocab_size)    # chunks of 3 positions
    g = torch.Generator().manual_seed(0)
    x, weights = torch.randint(0, 97, (3, 11), generator=g), torch.randn(3, 7, generator=g)
    results = []
    for chunked in (False, True):
        net.zero_grad()
        if chunked:
            lp, ent = net(x[:, :-1], logits_from=3, logprobs_of=x[:, 4:], temperature=0.7)
        else:
            logits = net(x[:, :-1], logits_from=3)                                  # [3, 7, V]
            lp, ent = ppo.logprobs_from_logits(logits, x[:, 4:], 0.7), ppo.entropy_from_logits(logits / 0.7)
        (lp * weights).sum().backward()
        results.append((lp.detach(), ent.detach(), [p.grad.clone() for p in net.parameters()]))
    (lp_a, ent_a, grads_a), (lp_b, ent_b, grads_b) = results
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_model_bf16_head_keeps_logits_in_fp32():
    """The chunked LM head on bf16 inputs: log-probs and gradients are those of the same bf16 numbers computed in
    fp64 (the logits are never rounded to bf16, the weight's gradient is summed over the chunks in fp32); rounding
    the logits to bf16 first, as before, is off by orders of magnitude more at |logit| ~ 30."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(40, 16, generator=g) * 3).bfloat16().requires_grad_()
    w = torch.randn(50, 16, generator=g).bfloat16().requires_grad_()
    tokens, weights = torch.randint(0, 50, (40,), generator=g), torch.randn(40, generator=g)
    lp, ent = model.head_logprobs(h, w, tokens, chunk=7)
    (lp * weights).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = h64 @ w64.T                                                                  # |z| up to ~40
    lp64 = torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)
    (lp64 * weights.double()).sum().backward()
    assert lp.dtype == ent.dtype == torch.float32 and z.abs().max() > 30
    err = (lp.double() - lp64).abs().max().item()
    rounded = torch.log_softmax(z.bfloat16().double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert err <= 1e-5 and (rounded - lp64).abs().max().item() > 100 * err
    for ours, ref in ((w.grad, w64.grad), (h.grad, h64.grad)):                     # bf16 gradients: ~3 digits
        assert ours.dtype == torch.bfloat16 and ((ours.double() - ref).norm() / ref.norm()).item() <= 1e-2
    critic = model.Qwen2Critic(model.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    critic = critic.bfloat16()
    x = torch.randint(0, 50, (2, 5), generator=g)
    values, hidden = critic(x), critic.model(x)                                      # the value head in fp32
    want = hidden.double() @ critic.value_head.weight[0].double()
    assert values.dtype == torch.float32 and (values.double() - want).abs().max() <= 1e-6 * want.abs().max()


def test_model_one_additive_mask_per_forward(tiny, monkeypatch):
    """Every layer's attention gets the one additive mask built for the forward (not a bool mask each SDPA call
    would convert), its rows at a 16-element stride (no kernel re-pads it); with padding, and in a decode step."""
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(model.F, "scaled_dot_product_attention", spy)
    net = model.load_model(tiny[0])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = rollout.KVCache(net.config, 2, 6, "cpu", torch.float32)
    net(torch.randint(0, 61, (2, 5)), attn, cache)
    net(torch.randint(0, 61, (2, 1)), torch.cat([attn, torch.ones(2, 1, dtype=torch.long)], 1), cache)
    layers = net.config.num_hidden_layers
    for forward in (masks[:layers], masks[layers:]):
        assert len(forward) == layers and all(m is forward[0] for m in forward)
        mask = forward[0]
        assert mask.dtype == torch.float32 and mask.stride(-2) % 16 == 0
        assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert masks[0][0, 0, 2, :2].tolist() == [float("-inf")] * 2      # row 0's first real token hides the pads


def test_model_no_cudnn_attention_on_cuda():
    """attention_kernels switches cuDNN's SDPA kernel off for CUDA (it plans every new shape), and leaves it for a
    CPU device alone."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        model.attention_kernels("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        model.attention_kernels("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("tied", [True, False])
def test_model_save_model_loads_in_transformers(tmp_path, tied):
    make_checkpoint(tmp_path / "src", tied=tied, legacy_config=True)
    ours = model.load_model(tmp_path / "src")
    model.save_model(ours, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    again = model.load_model(tmp_path / "out")
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() <= 1e-4
        assert torch.equal(again(x), ours(x))
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_model_value_head_from_base_checkpoint(tmp_path):
    ref = make_checkpoint(tmp_path / "base", tied=True)
    critic = model.load_model(tmp_path / "base", value_head=True)
    assert isinstance(critic, model.Qwen2Critic) and not hasattr(critic, "lm_head")
    x = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        hidden = ref(x, output_hidden_states=True).hidden_states[-1]        # [B, T, hidden] after the final norm
        values = critic(x)
        assert values.shape == (2, 7)
        assert (values - hidden @ critic.value_head.weight[0]).abs().max() <= 1e-4
        model.save_model(critic, tmp_path / "critic")                       # a critic checkpoint keeps its head
        again = model.load_model(tmp_path / "critic", value_head=True)
        assert torch.equal(again(x), values)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        model.load_model(tmp_path / "critic")                               # a critic is not a policy


def test_model_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load_model(tmp_path)
    make_checkpoint(tmp_path / "m", tied=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama",
                                                                "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        model.load_model(tmp_path / "llama")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(ValueError, match="sliding"):
        model.load_model(tmp_path / "m")
    # head_dim: older transformers write null, newer the number; another number is refused
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert model.Qwen2Config.from_dict({**cfg, "head_dim": None}).head_dim == head_dim
    assert model.Qwen2Config.from_dict({**cfg, "head_dim": head_dim}).head_dim == head_dim
    with pytest.raises(ValueError, match="head_dim"):
        model.Qwen2Config.from_dict({**cfg, "head_dim": head_dim * 2})
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*missing"):
        model.load_model(tmp_path / "m")
    tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(3)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.bias' has shape"):
        model.load_model(tmp_path / "m")
    for size in (0, 100):                                   # empty, and cut short by a failed copy
        raw = (tmp_path / "m" / "model.safetensors").read_bytes()
        (tmp_path / "m" / "model.safetensors").write_bytes(raw[:size])
        with pytest.raises(ValueError, match=r"m/model\.safetensors: not a readable safetensors file"):
            model.load_model(tmp_path / "m")


# ================================================================================================================
# rollout.py: cached sampling against transformers' generate
# ================================================================================================================

def test_rollout_greedy_batch_equals_transformers_alone_and_stops_at_eos(tiny):
    path, ref = tiny
    ours = model.load_model(path)
    prompts = [[5, 9, 2, 7, 1, 3], [4], [8, 1, 6, 60], [33, 12]]
    alone = [ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    eos = alone[0][3]                 # a token the model really emits: row 0 must stop on it (if it is new there)
    assert eos not in alone[0][:3]
    out = rollout.generate(ours, prompts, 10, temperature=0, eos_token_id=[eos, 1000])
    for p, resp, fin in zip(prompts, out.responses, out.finished):
        want = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                            pad_token_id=0)[0, len(p):].tolist()
        want = want[:want.index(eos) + 1] if eos in want else want       # transformers pads after the stop
        assert resp == want
        assert fin == (eos in resp)
    assert out.finished[0] and out.responses[0][-1] == eos and len(out.responses[0]) == 4


def test_rollout_cached_decoding_equals_uncached(tiny):
    """generate (prefill + one cached step per token) equals re-running the whole sequence every step."""
    ours = model.load_model(tiny[0])
    prompt = [7, 3, 9]
    out = rollout.generate(ours, [prompt], 12, temperature=0, eos_token_id=1000)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert out.responses[0] == seq[len(prompt):] and out.finished == [False]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_sampled_logprobs_equal_a_fresh_forward(tiny, temperature):
    ours = model.load_model(tiny[0])
    prompts = [[5, 9, 2, 7, 1, 3], [4], [8, 1, 6, 60]]
    g = torch.Generator().manual_seed(0)
    out = rollout.generate(ours, prompts, 15, temperature=temperature, eos_token_id=[2, 3], generator=g)
    again = rollout.generate(ours, prompts, 15, temperature=temperature, eos_token_id=[2, 3],
                             generator=torch.Generator().manual_seed(0))
    other = rollout.generate(ours, prompts, 15, temperature=temperature, eos_token_id=[2, 3],
                             generator=torch.Generator().manual_seed(1))
    assert out.responses == again.responses and out.responses != other.responses   # seeded = reproducible
    # sampling builds no autograd graph, even from a model whose weights require gradients (training's)
    assert all(p.requires_grad for p in ours.parameters()) and not any(lp.requires_grad for lp in out.logprobs)
    with torch.no_grad():
        for p, resp, lp, fin in zip(prompts, out.responses, out.logprobs, out.finished):
            assert len(lp) == len(resp) and fin == (resp[-1] in (2, 3))
            logits = ours(torch.tensor([p + resp]))[0, len(p) - 1:-1] / temperature   # [n, V]
            fresh = torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
            assert (fresh - lp).abs().max() <= 1e-3


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_rollout_static_decode_gives_the_same_tokens(tmp_path, kv_heads):
    """The static-shape decode step (fixed cache length, positions and key mask as tensors, random numbers drawn up
    front: what a CUDA graph captures) samples exactly the tokens of the default step, EOS stops included."""
    make_checkpoint(tmp_path / "m", heads=4, kv_heads=kv_heads)
    net = model.load_model(tmp_path / "m")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (1 + i % 5,), generator=g).tolist() for i in range(6)]
    for temperature in (1.0, 0.0):
        uniforms, sample, runs = {False: [], True: []}, rollout.sample, []
        try:
            for static in (False, True):
                rollout.sample = lambda *a, u=None, _seen=uniforms[static]: _seen.append(u) or sample(*a, u=u)
                runs.append(rollout.generate(net, prompts, 12, temperature=temperature, eos_token_id=[3, 10, 20],
                                             generator=torch.Generator().manual_seed(0), static=static))
        finally:
            rollout.sample = sample
        if temperature:     # both paths read one stream drawn up front: the same numbers on any device's generator
            drawn = torch.rand(12, 6, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            for static in (False, True):
                assert uniforms[static] and all(torch.equal(u, drawn[t]) for t, u in enumerate(uniforms[static]))
        assert runs[0].responses == runs[1].responses and runs[0].finished == runs[1].finished
        for a, b in zip(runs[0].logprobs, runs[1].logprobs):
            assert (a - b).abs().max() <= 1e-5


def test_rollout_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(rollout.sample(logits, 1.0, 0.7, g)[0]) for _ in range(400)}
    assert seen == {0, 1}             # 0.5 < 0.7 needs token 1; 0.8 >= 0.7: tokens 2, 3 are outside
    seen = {int(rollout.sample(logits, 1.0, 1.0, g)[0]) for _ in range(400)}
    assert seen == {0, 1, 2, 3}


# ================================================================================================================
# reward.py: the format and answer rules, the behaviour classifier
# ================================================================================================================

@pytest.mark.parametrize("text,valid,letter,expected", CASES)
def test_reward_parse_and_score_table(text, valid, letter, expected):
    got_valid, got_letter, _, _ = parse(text)
    assert (got_valid, got_letter) == (valid, letter)
    assert score(text, "C") == expected
    # the paper's ablation: -1 for a wrong or unreadable answer; +1 and the format penalty are unchanged
    assert score(text, "C", incorrect_reward=-1.0) == (-1.0 if expected == 0.0 else expected)
    assert score(text, "C", incorrect_reward=0.25) == (0.25 if expected == 0.0 else expected)


def test_reward_parse_returns_stripped_blocks():
    text = "<think>\n Gram-negative diplococci. \n</think>\n<answer> C. Ceftriaxone \n</answer><|endoftext|>"
    assert parse(text) == (True, "C", "Gram-negative diplococci.", "C. Ceftriaxone")
    assert parse("<think>x</think><answer>or</answer>") == (True, None, "x", "or")
    assert parse("<answer>C</answer>") == (False, None, "", "")


@pytest.mark.parametrize("gold", list("ABCDEFGHIJ"))
def test_reward_every_gold_letter(gold):
    for letter in "ABCDEFGHIJ":
        want = 1.0 if letter == gold else 0.0
        assert score(W(letter), gold) == want
        assert score(W(f"({letter}) some option"), gold) == want


@pytest.mark.parametrize("gold", ["K", "c", "", "CD", None, 3])
def test_reward_bad_gold_answer_raises(gold):
    with pytest.raises(ValueError, match="gold answer"):
        score(W("C"), gold)


def test_reward_format_matches_reference_on_random_texts():
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<|endoftext|>", "<|im_end|>", "<|endo", "ftext|>",
              "<thi", "nk>", " ", "\n", "C", "x", "(A)"]
    rng = random.Random(0)
    seen_valid = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        if rng.random() < 0.5:  # bias towards near-valid texts so both outcomes are well covered
            text = rng.choice(["", " ", "<|im_end|>"]) + "<think>" + text[:6] + "</think>" + text[6:] + \
                   "<answer>C</answer>" + rng.choice(["", "\n", "<|endoftext|>", "x"])
        assert parse(text)[0] == _reference_valid(text), repr(text)
        seen_valid += _reference_valid(text)
    assert 100 < seen_valid < 2900  # the sample exercised both valid and invalid texts


@pytest.mark.parametrize("i", range(len(ADVERSARIAL)))
def test_reward_linear_time_on_adversarial_megabyte(i):
    text, expected = ADVERSARIAL[i]
    assert len(text) >= 900_000
    t0 = time.perf_counter()
    got = score(text, "C")
    assert time.perf_counter() - t0 < 0.5
    assert got == expected


def test_reward_real_option_texts_read_as_their_letter():
    """Every real MedQA / MMLU-Pro health option, written "X. text" or "(X) text", reads as X."""
    if not SHARED.exists():
        pytest.skip("../shared not found: real option texts unavailable")
    options = []
    for name in ["medqa/dev.jsonl", "medqa/test.jsonl", "mmlu_pro/health_test.jsonl"]:
        for line in open(SHARED / "data" / name):
            opts = json.loads(line)["options"]
            options += opts.items() if isinstance(opts, dict) else zip("ABCDEFGHIJ", opts)
    assert len(options) > 10_000
    for letter, text in options:
        assert read_letter(f"{letter}. {text}") == letter, text
        assert read_letter(f"({letter}) {text}") == letter, text


@pytest.mark.parametrize("response,options,expected,why", CLASSIFY_CASES, ids=[c[3][:40] for c in CLASSIFY_CASES])
def test_reward_classify_hand_labelled(response, options, expected, why):
    assert classify(response, options) == expected, why


def test_reward_classify_every_label_has_two_examples():
    counts = {lab: sum(c[2] == lab for c in CLASSIFY_CASES) for lab in LABELS}
    assert all(n >= 2 for n in counts.values()), counts


def test_reward_classify_labels_agree_with_reward_format():
    """Only reasoning_outside may cross the reward's format line; the other labels sit on one side of it."""
    for response, options, expected, _ in CLASSIFY_CASES:
        valid = parse(response)[0]
        label = classify(response, options)
        if label == FORMAT_FAILURE:
            assert not valid
        elif label != REASONING_OUTSIDE:
            assert valid
    # text outside the tags: invalid under the reward, yet labelled reasoning_outside (checked first)
    assert parse(CLASSIFY_CASES[0][0])[0] is False and classify(CLASSIFY_CASES[0][0]) == REASONING_OUTSIDE
    # reasoning in the answer block: a valid format, still reasoning_outside
    assert parse(CLASSIFY_CASES[1][0])[0] is True and classify(CLASSIFY_CASES[1][0]) == REASONING_OUTSIDE


def test_reward_classify_long_option_text_discounted_only_when_options_given():
    resp = r("Penicillins act here.", "C. Inhibition of bacterial cell wall synthesis by binding D-Ala-D-Ala")
    # think has 3 words (<= 3) -> a bare think, so with the option text discounted it is direct_answer
    assert classify(resp, LONG_OPTION) == DIRECT_ANSWER
    assert classify(resp) == REASONING_OUTSIDE
    resp = r("Penicillins bind transpeptidases in the wall.", "C. Inhibition of bacterial cell wall synthesis by "
             "binding D-Ala-D-Ala")
    assert classify(resp, LONG_OPTION) == CONCISE  # 6 think words, no letter early; answer 10 - 9 = 1 word


def test_reward_direct_answer_rate():
    responses = [r("C"), r(SENTENCE * 25), r("Koplik spots mean measles."), "<think>truncated"]
    assert direct_answer_rate(responses) == 1 / 4  # only the bare one
    assert direct_answer_rate([r("(D)")]) == 1.0
    with pytest.raises(ValueError):
        direct_answer_rate([])


@pytest.mark.parametrize("name", list(HUGE))
def test_reward_classify_linear_time(name):
    response = HUGE[name]()
    assert len(response) >= 1_000_000
    for options in (None, MEASLES):
        t = time.perf_counter()
        classify(response, options)
        assert time.perf_counter() - t < 0.5, name


# ================================================================================================================
# ppo.py: the PPO math against hand computations and OpenRLHF 0.5.9
# ================================================================================================================

# ----------------------------------------------------------------------------- masked statistics

def test_ppo_masked_mean_ignores_padding():
    x, mask = ragged([4, 1, 3], T=5)
    x[1, 3] = float("inf")  # even inf/NaN on padding must not leak
    x[2, 4] = float("nan")
    rows = [[v for v, m in zip(xr, mr) if m] for xr, mr in zip(x.tolist(), mask.tolist())]
    flat = [v for r in rows for v in r]
    assert ppo.masked_mean(x, mask).item() == pytest.approx(sum(flat) / len(flat))
    per_row = ppo.masked_mean(x, mask, dim=-1)
    assert per_row.tolist() == pytest.approx([sum(r) / len(r) for r in rows])


@pytest.mark.parametrize("shift_mean", [True, False])
def test_ppo_masked_whiten_matches_selected_entries(shift_mean):
    x, mask = ragged([5, 2, 1], T=6, seed=1)
    sel = x[mask.bool()]
    mean, var = sel.mean(), sel.var(unbiased=False)  # biased variance, as OpenRLHF
    expect = (sel - mean) / torch.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    out = ppo.masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out[mask.bool()], expect)
    assert (out[~mask.bool()] == 0).all()


def test_ppo_masked_whiten_of_equal_values_is_zero():
    """65,536 equal advantages: the variance is 0, so every whitened value is 0 (not NaN, not fp32 noise)."""
    out = ppo.masked_whiten(torch.full((8, 8192), 0.7), torch.ones(8, 8192))
    assert (out == 0).all()


# ----------------------------------------------------------------------------- KL estimators

def test_ppo_kl_k1_k2_k3_hand_values():
    lp = [-1.0, -0.2, -3.0, -0.5]
    ref = [-1.5, -0.2, -1.0, -2.5]
    k1 = ppo.kl_penalty(torch.tensor([lp]), torch.tensor([ref]), kind="k1")[0].tolist()
    k2 = ppo.kl_penalty(torch.tensor([lp]), torch.tensor([ref]), kind="k2")[0].tolist()
    k3 = ppo.kl_penalty(torch.tensor([lp]), torch.tensor([ref]), kind="k3")[0].tolist()
    assert k1 == pytest.approx([a - b for a, b in zip(lp, ref)])
    assert k2 == pytest.approx([0.5 * (a - b) ** 2 for a, b in zip(lp, ref)])
    assert k3 == pytest.approx([math.exp(b - a) - (b - a) - 1 for a, b in zip(lp, ref)])
    assert k3[1] == 0.0 and all(v >= 0 for v in k3)  # k3 >= 0, zero iff equal


def test_ppo_kl_k3_finite_for_huge_log_ratios():
    lp = torch.tensor([[0.0, -1000.0, 0.0]])
    ref = torch.tensor([[-1000.0, 0.0, -1e30]])
    k3 = ppo.kl_penalty(lp, ref, kind="k3")
    assert torch.isfinite(k3).all() and (k3 > 0).all()
    with pytest.raises(ValueError, match="unknown kind"):
        ppo.kl_penalty(lp, ref, kind="k4")


def test_ppo_kl_loss_gradients_are_the_divergences():
    """As loss terms at tokens sampled from the policy, the estimators' expected gradients (computed exactly, summing
    over a 5-token vocabulary weighted by the policy) are: k1's zero, k2's the gradient of KL(pi || ref), k3's the
    gradient of KL(ref || pi) - each against autograd through the divergence itself."""
    g = torch.Generator().manual_seed(0)
    theta, ref = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    ref_lp = torch.log_softmax(ref, -1)

    def grad(f):
        t = theta.clone().requires_grad_()
        f(t).backward()
        return t.grad
    pi = torch.softmax(theta, -1)                                       # the sampling weights, held fixed
    expected = {k: grad(lambda t, k=k: (pi * ppo.kl_penalty(torch.log_softmax(t, -1), ref_lp, k)).sum())
                for k in ("k1", "k2", "k3")}
    forward = grad(lambda t: (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - ref_lp)).sum())
    backward = grad(lambda t: (ref_lp.exp() * (ref_lp - torch.log_softmax(t, -1))).sum())
    assert expected["k1"].abs().max() < 1e-6                            # (kl_penalty computes in fp32)
    assert torch.allclose(expected["k2"], forward, atol=1e-6) and torch.allclose(expected["k3"], backward, atol=1e-6)
    assert (forward - backward).abs().max() > 1e-2


# ----------------------------------------------------------------------------- rewards

def test_ppo_token_rewards_score_on_last_real_token():
    lengths, T, beta = [3, 1, 5], 5, 0.05
    kl, mask = ragged(lengths, T, seed=2)
    scores = torch.tensor([1.0, -0.5, 0.0])
    r = ppo.token_rewards(scores, kl, mask, beta)
    for b, n in enumerate(lengths):
        for t in range(T):
            if t >= n:
                expect = 0.0
            else:
                expect = -beta * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0)
            assert r[b, t].item() == pytest.approx(expect), (b, t)


def test_ppo_token_rewards_rejects_empty_row():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="no response token"):
        ppo.token_rewards(torch.zeros(2), torch.zeros(2, 2), mask, 0.1)


# ----------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.9), (0.5, 0.0)])
def test_ppo_gae_matches_naive_loop(gamma, lam):
    lengths, T = [6, 1, 3, 4], 6
    rewards, mask = ragged(lengths, T, seed=3)
    values, _ = ragged(lengths, T, seed=4)
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        a_ref, r_ref = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b].tolist() == pytest.approx(a_ref + [0.0] * (T - n), rel=1e-5, abs=1e-5)
        assert ret[b].tolist() == pytest.approx(r_ref + [0.0] * (T - n), rel=1e-5, abs=1e-5)


def test_ppo_gae_gamma1_lam1_is_reward_to_go_minus_value():
    # with gamma = lam = 1 the advantage telescopes to (sum of future rewards) - V(s_t)
    rewards = torch.tensor([[0.0, 0.0, 1.0, GARBAGE]])
    values = torch.tensor([[0.3, 0.5, 0.7, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.7, 0.5, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- critic-free estimators

def test_ppo_group_scores_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, -1.0,   1.0, 1.0, 1.0, 1.0])   # two prompts, 4 responses each
    # group 1: mean 0, unbiased std sqrt(2/3); group 2: all equal -> 0 whatever the scaling
    s = math.sqrt(2 / 3)
    assert ppo.group_scores(scores, 4, "grpo").tolist() == pytest.approx(
        [1 / s, 0.0, 0.0, -1 / s, 0.0, 0.0, 0.0, 0.0], rel=1e-5)
    assert ppo.group_scores(scores, 4, "grpo", scale_by_std=False).tolist() == [1.0, 0.0, 0.0, -1.0] + [0.0] * 4
    # rloo: each score minus the mean of the *other* three, computed naively
    naive = [scores[i].item() - sum(scores[j].item() for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i) / 3
             for i in range(8)]
    assert ppo.group_scores(scores, 4, "rloo").tolist() == pytest.approx(naive)
    with pytest.raises(ValueError, match="groups of 3"):
        ppo.group_scores(scores, 3, "grpo")
    with pytest.raises(ValueError, match="groups of 1"):
        ppo.group_scores(scores, 1, "rloo")


@pytest.mark.parametrize("value", [0.7, -1.0, 1.0, 0.1, 1e6])
def test_ppo_group_scores_of_equal_scores_are_exactly_zero(value):
    """A group of 15 equal scores (--incorrect-reward 0.7, say) has no signal: every advantage is exactly 0, with and
    without the std, for grpo and rloo (in fp32 the mean's rounding divided by a ~1e-8 std gave up to 0.1)."""
    scores = torch.tensor([value] * 15 + [1.0, 0.0, 0.7] * 5)
    for kind, std in (("grpo", True), ("grpo", False), ("rloo", True)):
        out = ppo.group_scores(scores, 15, kind, scale_by_std=std)
        assert out.dtype == torch.float32 and (out[:15] == 0).all() and (out[15:] != 0).any()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_ppo_discounted_returns_match_naive_loop(gamma):
    rewards, mask = ragged([5, 2, 1], T=6, seed=4)
    got = ppo.discounted_returns(rewards, mask, gamma)
    for b, n in enumerate([5, 2, 1]):
        for t in range(n):
            want = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, n))
            assert got[b, t].item() == pytest.approx(want, abs=1e-5)
        assert (got[b, n:] == 0).all()


def test_ppo_critic_free_advantage_is_the_shifted_score_minus_kl_to_come():
    """The whole critic-free pipeline on one response by hand: score on the last token, -beta*kl on each."""
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, GARBAGE]])
    adv = ppo.discounted_returns(ppo.token_rewards(torch.tensor([0.5]), kl, mask, 0.1), mask, 1.0)
    assert adv[0].tolist() == pytest.approx([0.5 - 0.06, 0.5 - 0.05, 0.5 - 0.03, 0.0])


# ----------------------------------------------------------------------------- policy loss

def test_ppo_policy_loss_clip_gradients():
    eps = 0.2
    # (ratio, advantage, clipped?) ; token-mean over these 6 tokens (row 2 has 2 padding slots)
    cases = [(1.5, 1.0, True), (0.5, -1.0, True),     # clip active: no gradient
             (1.1, 2.0, False), (0.5, 1.0, False),    # A > 0 unclipped: push log-prob up
             (1.5, -1.0, False), (0.9, -0.5, False)]  # A < 0 unclipped: push log-prob down
    old = torch.full((2, 4), -1.0)
    lp = old.clone()
    adv = torch.full((2, 4), GARBAGE)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    pos = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    for (b, t), (r, a, _) in zip(pos, cases):
        lp[b, t] = old[b, t] + math.log(r)
        adv[b, t] = a
    lp[1, 2:] = 50.0  # garbage log-probs on padding
    lp.requires_grad_(True)
    loss, clip_frac, approx_kl = ppo.policy_loss(lp, old, adv, mask, clip_eps=eps)
    loss.backward()
    N = len(cases)
    surr = [-min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a, _ in cases]
    assert loss.item() == pytest.approx(sum(surr) / N, rel=1e-5)
    for (b, t), (r, a, clipped) in zip(pos, cases):
        g = lp.grad[b, t].item()
        if clipped:
            assert g == 0.0
        else:
            assert g == pytest.approx(-r * a / N, rel=1e-5)  # d(-r A)/d logp = -r A
            assert (g < 0) == (a > 0)  # gradient descent raises logp iff A > 0
    assert (lp.grad[1, 2:] == 0).all()
    assert clip_frac.item() == pytest.approx(2 / N)
    assert approx_kl.item() == pytest.approx(sum(-math.log(r) for r, _, _ in cases) / N, rel=1e-5)


def test_ppo_policy_loss_token_mean_vs_seq_mean():
    # at ratio 1 the loss is -A; rows of length 3 and 1 weigh differently under the two averagings
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [10.0, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    tok, _, _ = ppo.policy_loss(lp, lp, adv, mask)
    seq, _, _ = ppo.policy_loss(lp, lp, adv, mask, agg="seq")
    fixed, _, _ = ppo.policy_loss(lp, lp, adv, mask, agg="fixed", horizon=8)      # Dr. GRPO: sum / (2 x 8)
    assert tok.item() == pytest.approx(-(1 + 2 + 3 + 10) / 4)
    assert seq.item() == pytest.approx(-((1 + 2 + 3) / 3 + 10) / 2)
    assert fixed.item() == pytest.approx(-(1 + 2 + 3 + 10) / (2 * 8))


# ----------------------------------------------------------------------------- value loss

def test_ppo_value_loss_clipping_hand_computed():
    eps, R = 0.2, 1.0
    old = torch.zeros(1, 5)
    v = torch.tensor([[0.5, -0.5, 0.1, 1.5, GARBAGE]], requires_grad=True)
    returns = torch.full((1, 5), R)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss = ppo.value_loss(v, old, returns, mask, clip_eps=eps)
    loss.backward()
    N, terms, grads = 4, [], []
    for vi in v[0, :N].tolist():
        vc = max(-eps, min(eps, vi))  # old = 0
        e1, e2 = (vi - R) ** 2, (vc - R) ** 2
        terms.append(0.5 * max(e1, e2))
        # clipped error bigger (and v really moved outside old +- eps) -> no gradient
        grads.append(0.0 if e2 > e1 else (vi - R) / N)
    assert loss.item() == pytest.approx(sum(terms) / N)
    assert v.grad[0, :N].tolist() == pytest.approx(grads)
    assert grads[0] == 0.0 and grads[3] == 0.0 and grads[1] != 0.0  # the cases are what we meant
    assert v.grad[0, N].item() == 0.0


def test_ppo_value_loss_unclipped():
    v = torch.tensor([[0.5, 3.0, GARBAGE]])
    old = torch.zeros(1, 3)
    R = torch.tensor([[1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = ppo.value_loss(v, old, R, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * ((0.5 - 1) ** 2 + (3.0 + 1) ** 2) / 2)


def test_ppo_value_loss_token_mean_vs_seq_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    R = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    tok = ppo.value_loss(v, v, R, mask, clip_eps=None)
    seq = ppo.value_loss(v, v, R, mask, clip_eps=None, agg="seq")
    assert tok.item() == pytest.approx(0.5 * (1 + 4 + 9 + 16) / 4)
    assert seq.item() == pytest.approx(0.5 * ((1 + 4 + 9) / 3 + 16) / 2)


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_logprobs_from_logits_matches_categorical(temperature, dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 4, 11, generator=g) * 30).to(dtype)  # large logits: stability
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    before = logits.clone()
    out = ppo.logprobs_from_logits(logits, tokens, temperature)
    ref = torch.distributions.Categorical(logits=logits.float() / temperature).log_prob(tokens)
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)  # caller's logits untouched


def test_ppo_entropy_matches_categorical():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 13, generator=g) * 40
    logits[0, 0] = 0.0  # uniform: entropy log(13)
    out = ppo.entropy_from_logits(logits)
    torch.testing.assert_close(out, torch.distributions.Categorical(logits=logits).entropy(), rtol=1e-4, atol=1e-5)
    assert out[0, 0].item() == pytest.approx(math.log(13), rel=1e-6)


# ================================================================================================================
# train.py (with recipe.py, checkpoint.py, memory.py): FSDP = one process, resume = uninterrupted, learning
# ================================================================================================================

def test_train_preset_update_and_schedule_equal_openrlhf_059(tmp_path):
    """--preset med-rlvr against the transcription above: its learning rate at every optimizer step of a one-pass
    MedQA run (19 full rollout steps of 512, 4 updates each, as 0.5.9's loader, which drops the partial last batch;
    the cosine laid over 0.5.9's max_steps = 10178 // 128 = 79 with ceil(79 * 0.03) = 3 of warmup, the first update
    at lr 0), and one update of actor and critic on fixed experience (micro-batches of 2 of a minibatch of 6
    responses of unequal lengths) equal to one SGD step on 0.5.9's per-response-mean policy and value losses."""
    args = train.parse_args(["--preset", "med-rlvr"])
    n_train, per_step = 10178, args.rollout_batch // args.train_batch
    steps = n_train // args.rollout_batch
    max_steps = math.ceil(1 * (n_train * 1 // 128 * 1))                          # num_episodes, n_samples, max_epochs
    want = [_059_lr_lambda(u, num_warmup_steps=math.ceil(max_steps * 0.03), num_training_steps=max_steps,
                           min_lr_rate=0.1) for u in range(steps * per_step)]
    total = recipe.schedule_length(args, n_train, steps)
    assert [recipe.lr_factor(args, u // per_step, u % per_step, total) for u in range(steps * per_step)] == want
    assert (max_steps, len(want), want[0], want[3]) == (79, 76, 0.0, 1.0)

    make_checkpoint(tmp_path / "m", tied=True, heads=4, kv_heads=2, layers=2)
    actor, critic = model.load_model(tmp_path / "m").train(), model.load_model(tmp_path / "m", value_head=True).train()
    prompts, responses, rows = _fixed_experience(actor.config.vocab_size)
    exp = _experience_for(prompts, responses, rows)
    before = {(net, n): p.detach().clone() for net in (actor, critic) for n, p in net.named_parameters()}
    lp, _ = train.response_logprobs(actor, exp.input_ids, exp.attn, exp.P, 1.0)
    values = train.response_values(critic, exp.input_ids, exp.attn, exp.P)
    (_059_policy_loss(lp, exp.old_logprobs, exp.advantages, exp.mask)
     + _059_value_loss(values, exp.values, exp.returns, exp.mask)).backward()
    want = {(net, n): before[net, n] - p.grad for net in (actor, critic) for n, p in net.named_parameters()}
    for net in (actor, critic):
        net.zero_grad()
    opts = [torch.optim.SGD(net.parameters(), lr=1.0) for net in (actor, critic)]
    train.ppo_update(actor, critic, *opts, exp, list(range(len(prompts))), micro_batch=2, temperature=1.0,
                     clip=args.clip, value_clip=args.value_clip, grad_clip=1e9, loss_agg=args.loss_agg, world=1)
    moved = 0.0
    for net in (actor, critic):
        for n, p in net.named_parameters():
            assert (p.detach() - want[net, n]).abs().max() <= 1e-6, n
            moved = max(moved, (p.detach() - before[net, n]).abs().max().item())
    assert moved > 1e-3


def test_train_reward_controls_against_hand_computation():
    """--reward format / random: the controls keep the format's -1 and drop the answer's check; the verifiable one is
    reward.score's; the random coin comes from the step's generator (a resumed run draws the same)."""
    scores = [1.0, 0.0, -1.0, 0.0, 1.0, -1.0] * 200
    assert train.training_scores(scores, "verifiable", 0.0, None) is scores
    assert train.training_scores(scores, "format", 0.0, None) == [1.0, 1.0, -1.0, 1.0, 1.0, -1.0] * 200
    draw = lambda: train.training_scores(scores, "random", -0.5, torch.Generator().manual_seed(3))   # noqa: E731
    coins = draw()
    assert coins == draw()                                                          # seeded: the same again
    assert all((c == -1.0) == (s == -1.0) for c, s in zip(coins, scores))           # a broken format stays -1
    valid = [c for c, s in zip(coins, scores) if s > -1.0]
    assert set(valid) == {1.0, -0.5} and abs(valid.count(1.0) / len(valid) - 0.5) < 0.05    # a fair coin
    right = [c for c, s in zip(coins, scores) if s == 1.0]
    assert 0.4 < right.count(1.0) / len(right) < 0.6                                # blind to the answer


@pytest.mark.parametrize("advantage", ["gae", "reinforce++"])
def test_train_whiten_flag_when_every_response_scores_the_same(tmp_path, advantage):
    """A batch whose responses all score +1 carries no signal in its scores: its GAE advantages are the critic's
    errors (and the KL), its REINFORCE++ returns the KL alone. --whiten (OpenRLHF's) scales them to unit std over the
    batch's tokens; --no-whiten keeps them as computed. Both against ppo.py's estimator applied here to the
    experience's own log-probs and values (ppo.py's functions have their own tests against hand computations)."""
    make_checkpoint(tmp_path / "m", tied=True, heads=4, kv_heads=2, layers=2)
    actor, critic = model.load_model(tmp_path / "m"), model.load_model(tmp_path / "m", value_head=True)
    ref = model.init_model(actor.config, seed=1)                                  # so that the KL is not 0
    prompts, responses, _ = _fixed_experience(actor.config.vocab_size)
    out = rollout.Rollout(responses, [torch.zeros(len(r)) for r in responses], [True] * len(responses))
    got = {}
    for whiten in (True, False):
        args = train.parse_args(["--advantage", advantage, "--whiten" if whiten else "--no-whiten"])
        got[whiten] = train.make_experience(actor, critic if advantage == "gae" else None, ref, prompts, out,
                                            [""] * 6, [1.0] * 6, [1.0] * 6, args, 1, "cpu")
    exp, mask = got[False], got[False].mask
    rewards = ppo.token_rewards(torch.ones(6), ppo.kl_penalty(exp.old_logprobs, exp.ref_logprobs) * mask, mask, 0.01)
    want = (ppo.compute_gae(rewards, exp.values, mask, 1.0, 1.0)[0] if advantage == "gae"
            else ppo.discounted_returns(rewards, mask, 1.0))
    torch.testing.assert_close(exp.advantages, want)
    torch.testing.assert_close(got[True].advantages, ppo.masked_whiten(want, mask))
    assert "whiten" in recipe.trajectory_flags(args)                  # a resumed run keeps it; grpo and rloo ignore it
    assert "whiten" not in recipe.trajectory_flags(train.parse_args(["--advantage", "rloo"]))
    on = got[True].advantages[mask.bool()]
    assert abs(on.mean()) < 1e-5 and abs(on.pow(2).mean() - 1) < 1e-3           # unit scale, whatever the scores


def test_train_presets_grpo_and_dr_grpo_are_the_published_forms():
    grpo, dr = train.parse_args(["--preset", "grpo"]), train.parse_args(["--preset", "dr-grpo"])
    for a in (grpo, dr):
        assert (a.advantage, a.gamma, a.ppo_epochs) == ("grpo", 1.0, 1) and a.samples_per_prompt > 1
    assert (grpo.group_std, grpo.loss_agg, grpo.kl_in, grpo.kl_estimator, grpo.kl_coef) == (True, "seq", "loss", "k3",
                                                                                           0.04)
    assert (dr.group_std, dr.loss_agg, dr.kl_coef) == (False, "fixed", 0.0)
    assert train.parse_args(["--preset", "grpo", "--kl-coef", "0.0"]).kl_coef == 0.0        # a flag still wins


def test_train_logs_out_of_distribution_accuracy(tmp_path, monkeypatch):
    """--ood-data: MMLU-Pro's --ood-category rows (the 6 health ones of 9) evaluated beside --eval-data (its first 8)
    before the first step and after the last, as ood_accuracy / ood_format in the same rows."""
    make_demo_like_checkpoint(tmp_path / "base")
    rows = [json.dumps({**MMLU_ROW, "question_id": i, "question": f"Q{i}?", "category": "health" if i % 3 else "law"})
            for i in range(9)]
    write_lines(tmp_path / "mmlu.jsonl", rows)
    seen, real = [], evaluate.evaluate_one
    monkeypatch.setattr(evaluate, "evaluate_one", lambda policy, tok, exs, **k: seen.append([e.question for e in exs])
                        or real(policy, tok, exs, **k))
    train.main(_ppo_argv(tmp_path / "base", tmp_path / "run", 1, "--ood-data", str(tmp_path / "mmlu.jsonl"),
                         "--max-new-tokens", "8", "--eval-samples", "2"))
    evals = [r for r in _metrics(tmp_path / "run") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1] and all({"ood_accuracy", "ood_format"} <= set(r) for r in evals)
    health = [f"Q{i}?" for i in range(9) if i % 3]
    assert [len(s) for s in seen] == [8, 6, 8, 6] and seen[1] == seen[3] == health
    # --eval-samples: the last row's greedy and sampled numbers are those of the exported policy
    final, tok = model.load_model(tmp_path / "run" / "final"), data.load_tokenizer(tmp_path / "run" / "final")
    held = {"eval": demo.held_out()["eval"][:8], "ood": data.load_mmlu_pro(tmp_path / "mmlu.jsonl", "health")}
    assert evals[1] == {"step": 1, **evaluate.held_out_row(final, tok, held, samples=2, max_new_tokens=8, batch=64)}
    ran = json.loads((tmp_path / "run" / "args.json").read_text())["machine"]     # what ran it, recorded once
    assert ran["torch"] == torch.__version__ and ran["cpu"] and ran["cores"] == len(os.sched_getaffinity(0))
    # its own --train-data without --eval-data: nothing held out (the demo's sets go with the demo's questions only)
    rows = [json.dumps({**MEDQA_ROW, "question": f"Which dose {i}?"}) for i in range(8)]
    (tmp_path / "medqa.jsonl").write_text("\n".join(rows))
    seen.clear()
    train.main(_ppo_argv(tmp_path / "base", tmp_path / "own", 1, "--train-data", str(tmp_path / "medqa.jsonl"),
                         "--max-new-tokens", "8"))
    assert not seen and [r["step"] for r in _metrics(tmp_path / "own")] == [1]


def test_train_sends_metrics_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """--tensorboard DIR and --wandb PROJECT (offline): every number of every metrics.jsonl row arrives at its step,
    read back from TensorBoard's event file and from W&B's run file; a sampled step's responses form a W&B table."""
    pytest.importorskip("tensorboard", reason="the --tensorboard test needs tensorboard (.ci/run installs it)")
    pytest.importorskip("wandb", reason="the --wandb test needs wandb (.ci/run installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    make_demo_like_checkpoint(tmp_path / "base")
    for k in ("WANDB_MODE", "WANDB_API_KEY"):                      # no way to log in: one line, before any work
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", tmp_path / "run", 2, "--wandb", "p")),
             "--wandb: no W&B API key", tmp_path / "run")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(_ppo_argv(tmp_path / "base", tmp_path / "run", 2, "--max-new-tokens", "8", "--tensorboard",
                         str(tmp_path / "tb"), "--wandb", "med-rlvr-test"))
    rows = _metrics(tmp_path / "run")
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    history = _wandb_history(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    for key in ("reward", "kl", "policy_loss", "value_loss", "eval_accuracy"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [(e.step, e.value) for e in board.Scalars(key)] == [(s, pytest.approx(v)) for s, v in want], key
        assert [(h["_step"], h[key]) for h in history if key in h] == [(s, pytest.approx(v)) for s, v in want], key
    tables = [h for h in history if "samples/nrows" in h]
    assert [(h["_step"], h["samples/nrows"]) for h in tables] == [(1, 8), (2, 8)]


def test_train_bad_inputs_give_clear_errors(tmp_path):
    tok = make_demo_like_checkpoint(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train.main(_ppo_argv(tmp_path / "base", tmp_path / "out", 1, "--train-data", str(tmp_path / "nope.jsonl")))
    (tmp_path / "corrupt").mkdir()
    shutil.copy(tmp_path / "base" / "tokenizer.json", tmp_path / "corrupt" / "tokenizer.json")
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        train.main(_ppo_argv(tmp_path / "corrupt", tmp_path / "out", 1))
    config = model.Qwen2Config.from_json(tmp_path / "base")
    config.vocab_size = tok.get_vocab_size() - 10                     # a model that cannot embed every token
    model.save_model(model.init_model(config), tmp_path / "small")
    shutil.copy(tmp_path / "base" / "tokenizer.json", tmp_path / "small" / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer"):
        train.main(_ppo_argv(tmp_path / "small", tmp_path / "out", 1))


@pytest.mark.parametrize("script, argv, flag", [
    (train, ["--temperature", "-1"], "--temperature"), (train, ["--temperature", "0"], "--temperature"),
    (train, ["--top-p", "0"], "--top-p"), (train, ["--loss-agg", "foo"], "--loss-agg"),
    (train, ["--steps", "-1"], "--steps"), (train, ["--train-batch", "0"], "--train-batch"),
    (train, ["--ppo-epochs", "0"], "--ppo-epochs"), (train, ["--micro-batch", "0"], "--micro-batch"),
    (train, ["--rollout-batch", "0"], "--rollout-batch"), (train, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (train, ["--kl-estimator", "k4"], "--kl-estimator"), (train, ["--actor-lr", "nan"], "--actor-lr"),
    (evaluate, ["--limit", "-1"], "--limit"), (evaluate, ["--batch", "0"], "--batch"),
    (evaluate, ["--dose", "-5"], "--dose"), (sft, ["--batch", "0"], "--batch"), (bench, ["--new", "x"], "--new"),
    (train, ["--eval-samples", "-1"], "--eval-samples"), (sft, ["--eval-samples", "x"], "--eval-samples"),
], ids=lambda x: x.__name__ if hasattr(x, "__name__") else None)
def test_train_sft_evaluate_bench_bad_flags_one_line(script, argv, flag, capsys):
    """A bad flag value stops the script at once with one line that names the flag (no traceback, no usage)."""
    main = script.main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {flag}" in err, err


def test_train_bad_inputs_found_before_any_work(tmp_path):
    make_demo_like_checkpoint(tmp_path / "base")
    out = tmp_path / "out"
    argv = lambda *extra: _ppo_argv(tmp_path / "base", out, 1, *extra)          # noqa: E731
    (tmp_path / "empty.jsonl").write_text("")
    _mistake(lambda: train.main(argv("--train-data", str(tmp_path / "empty.jsonl"))), "empty.jsonl: no examples", out)
    for script in (train, sft):                  # a demo base that is not built: before --out is claimed
        _mistake(lambda: script.main(["--base-seed", "97", "--out", str(out)]), "base build 97 is not built yet", out)
    write_lines(tmp_path / "four.jsonl", [json.dumps(MEDQA_ROW)] * 4)
    _mistake(lambda: train.main(argv("--train-data", str(tmp_path / "four.jsonl"))),
             "4 examples, fewer than --rollout-batch 8", out)
    _mistake(lambda: train.main(argv("--train-batch", "3")), "multiple of --train-batch 3", out)
    _mistake(lambda: train.main(argv("--kl-in", "loss")), "--kl-in loss needs --kl-estimator k2 or k3", out)
    for estimator in ("grpo", "rloo"):
        _mistake(lambda: train.main(argv("--advantage", estimator, "--samples-per-prompt", "2", "--gamma", "0.9")),
                 f"--advantage {estimator} with --gamma 0.9", out)
    _mistake(lambda: train.main(argv("--advantage", "grpo")), "--samples-per-prompt 2 or more", out)
    assert sft.parse_args(["--model", "m", "--train-data", "t"]).out == "runs/sft" and sft.parse_args([]).out == \
        "runs/demo-sft"
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "nobase", out, 1)), "nobase", out)
    write_lines(tmp_path / "long.jsonl", [json.dumps(r) for r in [{**MEDQA_ROW, "question": "Q" * 400}] * 8])
    _mistake(lambda: train.main(argv("--train-data", str(tmp_path / "long.jsonl"), "--max-prompt-len", "16")),
             "exceed --max-prompt-len 16", out)
    shutil.copytree(tmp_path / "base", tmp_path / "cut")                   # a copy that stopped half-way
    raw = (tmp_path / "cut" / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "cut", out, 1)), "cut/model.safetensors: not a readable", out)
    # evaluate: the second model's path is wrong -> nothing is evaluated, no results file
    _mistake(lambda: evaluate.main(["--model", str(tmp_path / "base"), str(tmp_path / "typo"), "--dose", "4",
                                    "--out", str(tmp_path / "res.json")]), "typo", tmp_path / "res.json")
    # sft: fewer examples than --batch -> no "saved" untouched base
    _mistake(lambda: sft.main(["--model", str(tmp_path / "base"), "--train-data", str(tmp_path / "four.jsonl"), "--out",
                               str(tmp_path / "sft"), "--batch", "8"]), "4 examples, fewer than --batch 8",
             tmp_path / "sft")


def test_train_protects_an_existing_run_and_locks_it(tmp_path):
    make_demo_like_checkpoint(tmp_path / "base")
    out = tmp_path / "run"
    train.main(_ppo_argv(tmp_path / "base", out, 1, "--save-every", "0"))
    before = (out / "metrics.jsonl").read_text()
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", out, 2)), "holds a run.*--resume.*--overwrite")
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", out, 2, "--resume")), "no checkpoint to continue")
    assert (out / "metrics.jsonl").read_text() == before                     # nothing was touched
    assert _unlocked(out)                                                    # released after each run
    # another live run holds the lock: refused, naming it; once it is killed (SIGKILL) the kernel frees the lock
    holder = subprocess.Popen([sys.executable, "-c", "import checkpoint, pathlib, sys, time; "
                               "f = checkpoint.lock(pathlib.Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", out, 2, "--overwrite")), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    train.main(_ppo_argv(tmp_path / "base", out, 2, "--overwrite"))
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 2] and _unlocked(out)


def test_train_resume_checks_flags_and_survives_torn_files(tmp_path):
    make_demo_like_checkpoint(tmp_path / "base")
    out = tmp_path / "run"
    train.main(_ppo_argv(tmp_path / "base", out, 2))                         # checkpoint at step 2
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", out, 3, "--resume", "--seed", "1",
                                          "--rollout-batch", "16")),
             "made with --rollout-batch 8, --seed 0, not --rollout-batch 16, --seed 1")
    state = json.loads((out / "checkpoint" / "state.json").read_text())   # a checkpoint older than --whiten: its
    del state["args"]["whiten"]                                            # run whitened, so --no-whiten is refused
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", out, 3, "--resume", "--no-whiten")),
             "made with --whiten True, not --whiten False")
    make_demo_like_checkpoint(tmp_path / "other", seed=1)
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "other", out, 3, "--resume")), "trained from --model")
    # a kill between the checkpoint's two renames leaves only checkpoint.old; a kill mid-write tears metrics
    (out / "checkpoint").rename(out / "checkpoint.old")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    # the same base, written another way (absolute, trailing slash), is the same model
    train.main(_ppo_argv(str(tmp_path / "base") + "/", out, 3, "--resume"))
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3, 3]
    assert not (out / "checkpoint.old").exists()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    # the next save, with both in place (a kill after the second rename), keeps going too
    shutil.copytree(out / "checkpoint", out / "checkpoint.old")
    train.main(_ppo_argv(tmp_path / "base", out, 4, "--resume"))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    # under the cosine schedule --steps sets every learning rate: it may not change on resume
    train.main(_ppo_argv(tmp_path / "base", tmp_path / "cos", 2, "--lr-schedule", "cosine"))
    _mistake(lambda: train.main(_ppo_argv(tmp_path / "base", tmp_path / "cos", 3, "--resume", "--lr-schedule",
                                          "cosine")), "made with --steps 2, not --steps 3")


def test_train_diverging_run_stops_and_writes_nothing_non_finite(tmp_path):
    """--actor-lr 1e3 --critic-lr 1e6: the first update wrecks the weights, the next losses are NaN; those updates
    are skipped, the run stops with a message, and no NaN reaches metrics.jsonl, a checkpoint or final/."""
    make_demo_like_checkpoint(tmp_path / "base")
    out = tmp_path / "bad"
    with pytest.raises(common.Abort, match="non-finite"):
        train.main(_ppo_argv(tmp_path / "base", out, 6, "--actor-lr", "1e3", "--critic-lr", "1e6", "--save-every", "1"))
    for f in out.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
    assert not (out / "final").exists() and _unlocked(out)
    assert "NaN" not in (out / "metrics.jsonl").read_text()
    # the writers themselves refuse non-finite tensors: the checkpoint (sharded weights and optimizer state)
    tok = data.load_tokenizer(tmp_path / "base")
    net = model.load_model(tmp_path / "base").train()
    opt = torch.optim.AdamW(net.parameters())
    with torch.no_grad():
        net.model.norm.weight[0] = float("nan")
    _mistake(lambda: checkpoint.save(tmp_path / "ck", {"actor": (net, opt)}, {"step": 1}, tok, 0, 1),
             r"model\.norm\.weight is not finite")
    assert not (tmp_path / "ck" / "checkpoint").exists()
    # the writers themselves refuse non-finite weights
    net = model.load_model(tmp_path / "base")
    with torch.no_grad():
        net.model.norm.weight[0] = float("nan")
    _mistake(lambda: common.export(net, data.load_tokenizer(tmp_path / "base"), tmp_path / "nan", 0, 1),
             r"model\.norm\.weight is not finite", tmp_path / "nan")
    # sft too: --lr 1e6 stops after a few skipped steps and leaves the weights finite
    tok = data.load_tokenizer(tmp_path / "base")
    qs = demo.make_questions(64, seed=1)
    pairs = data.tokenize_pairs(tok, [(data.build_prompt(q), demo.solution(q, True)) for q in qs], 512)
    net = model.load_model(tmp_path / "base").train()
    with pytest.raises(common.Abort, match="non-finite"):
        sft.train(net, pairs, epochs=1, batch=8, micro_batch=8, lr=1e6, warmup=1, log=lambda msg: None)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_train_export_in_bf16_loads_in_transformers(tmp_path):
    tok = make_demo_like_checkpoint(tmp_path / "base")
    net = model.load_model(tmp_path / "base")
    common.export(net, tok, tmp_path / "bf16", 0, 1, "bfloat16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("A child weighing 7 kg").ids])
    with torch.no_grad():
        assert (theirs(x).logits - net(x)).abs().max() <= 0.05             # bf16 rounding of the weights only


def test_train_and_sft_help_show_the_values_that_will_apply(capsys):
    """--help under --preset shows the preset's values; sft.py's --help without --model shows the demo's settings
    (DEMO_BASELINE), with --model the general defaults: what a user reads is what the run will use."""
    def help_of(parse, argv):
        with pytest.raises(SystemExit):
            parse([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())
    actor_lr = "--actor-lr ACTOR_LR actor AdamW learning rate (the demo: at 5e-4, once the policy is almost " \
               "deterministic, one update in a few runs is large enough to break it for a step; docs/study.md)"
    assert f"{actor_lr} (default: 1e-06)" in help_of(train.parse_args, ["--preset", "med-rlvr"])
    assert f"{actor_lr} (default: 0.0002)" in help_of(train.parse_args, [])
    assert train.parse_args(["--preset", "med-rlvr"]).actor_lr == 1e-6
    assert "--lr LR AdamW learning rate after warmup (default: 0.001)" in help_of(sft.parse_args, [])
    assert "--lr LR AdamW learning rate after warmup (default: 1e-05)" in help_of(sft.parse_args, ["--model", "x"])


def test_train_memory_plan_against_the_peak_of_a_real_cpu_step(tmp_path):
    """The plan against a measurement. A fresh process runs train.py's PPO step (actor, critic, reference; fp32,
    one process) twice: first on a 40k-parameter model, which pays what any run costs once (thread pools, kernels,
    the tokenizer, the data), then on a 3.6M-parameter one, whose rise of the resident memory (VmHWM, reset
    before it) is what the model and its step take. The plan of the same flags must be within 0.85-1.25 of that
    rise: leaving out the critic, or counting the LM head's chunk at its 3B size, falls outside. (On a CPU AdamW
    steps parameter by parameter, not foreach, so the plan's GPU temporary is not what is compared here.)"""
    tok = make_demo_like_checkpoint(tmp_path / "tiny")
    make_demo_like_checkpoint(tmp_path / "base")
    net = model.init_model(model.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=192, intermediate_size=576,
                                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                             tie_word_embeddings=True, torch_dtype="float32"))
    model.save_model(net, tmp_path / "base")
    flags = ["--out", str(tmp_path / "run"), "--overwrite", "--steps", "1", "--rollout-batch", "8", "--train-batch",
             "8", "--micro-batch", "8", "--ppo-epochs", "1", "--max-new-tokens", "8", "--eval-limit", "2",
             "--save-every", "0", "--precision", "fp32", "--max-prompt-len", "64"]
    script = ("import sys, train\n"
              "def status(key): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
              "train.main(['--model', sys.argv[1], *sys.argv[3:]])\n"
              "open('/proc/self/clear_refs', 'w').write('5')      # VmHWM := VmRSS\n"
              "before = status('VmRSS')\n"
              "train.main(['--model', sys.argv[2], *sys.argv[3:]])\n"
              "print('rise_kb', status('VmHWM') - before)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tiny"), str(tmp_path / "base"), *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rise_gb = int(out.stdout.split("rise_kb")[-1]) * 1024 / 1e9
    plan, host = memory.memory_plan(net.config, train.parse_args(flags), 1, False)
    assert 0.85 <= sum(plan.values()) / rise_gb <= 1.25, (plan, rise_gb)
    assert host == 0.0 and "critic (fp32 weights, grads, AdamW)" in plan


def test_train_memory_plan_refuses_3b_on_one_gpu(tmp_path, capsys):
    """The plan's parameter count equals transformers' Qwen2.5-3B (built on the meta device: no memory); 16 bytes
    each for actor and critic do not fit one 80 GB GPU, and the refusal says what would (--offload, 2 GPUs); 8 GPUs
    fit, and so does one with --offload, which moves those bytes to host memory; --plan's table says the same."""
    cfg = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).parameters())
    args = train.parse_args(["--preset", "med-rlvr"])
    config = model.Qwen2Config(**cfg)
    plan, _ = memory.memory_plan(config, args, 1, False)
    assert plan["actor (fp32 weights, grads, AdamW)"] == pytest.approx(16 * n / 1e9)
    assert plan["reference"] == pytest.approx(2 * n / 1e9)
    fp32, _ = memory.memory_plan(config, train.parse_args(["--preset", "med-rlvr", "--precision", "fp32"]), 1, False)
    assert fp32["reference"] == pytest.approx(4 * n / 1e9) and sum(fp32.values()) > sum(plan.values())
    with pytest.raises(ValueError, match=r"needs about \d+ GB per GPU .* has 80 GB: use --offload \(then ~\d+ GB of "
                                         r"host memory a node\); or 2 GPUs \(now 1\); or --grad-checkpoint"):
        memory.check_fits(config, args, 1, 80.0)
    memory.check_fits(config, args, 8, 80.0)
    grpo = train.parse_args(["--preset", "med-rlvr", "--advantage", "grpo", "--samples-per-prompt", "4"])
    assert "critic (fp32 weights, grads, AdamW)" not in memory.memory_plan(config, grpo, 8, False)[0]
    # --offload: actor and critic leave the GPU for host memory, 16 bytes a parameter each (the critic: the body and
    # a value head, the tied LM head not its own), and the optimizer steps there, with AdamW's fp32 temporary the
    # size of the larger model's shard: all of a node's ranks' shards together
    offloaded, host = memory.memory_plan(config, args, 4, True)
    assert not [k for k in offloaded if "AdamW" in k]
    assert host == pytest.approx((16 * (n + n + 2048) + 4 * (n + 2048)) / 1e9)
    on_gpu, _ = memory.memory_plan(config, train.parse_args(["--preset", "med-rlvr", "--micro-batch", "1",
                                                             "--rollout-chunk", "1", "--eval-batch", "1"]), 1, False)
    assert on_gpu["optimizer step (AdamW's temporary)"] == pytest.approx(4 * (n + 2048) / 1e9)  # the largest phase
    offload = train.parse_args(["--preset", "med-rlvr", "--offload"])
    memory.check_fits(config, offload, 1, 80.0, host_gb=512.0)
    with pytest.raises(ValueError, match=r"--offload needs about 111 GB of host memory a node, this one has 64 GB"):
        memory.check_fits(config, offload, 1, 80.0, host_gb=64.0)
    (tmp_path / "3b").mkdir()                      # train.py --plan: config.json is all it reads, nothing is written
    (tmp_path / "3b" / "config.json").write_text(json.dumps(config.to_json("Qwen2ForCausalLM")))
    args.model = str(tmp_path / "3b")
    table = memory.plan_table(args, gpus=(8, 80.0)).splitlines()
    one, one_offload = (next(x for x in table if x.startswith(f"| 1 | {o} |")) for o in ("no", "yes"))
    assert one.endswith("| - | - | - | fits | ok |")                                       # 121 GB: a 141 GB GPU
    assert one_offload.split(" | ")[-5:-1] == ["-", "fits", "fits", "fits"]               # 23 GB (host RAM: ours)
    assert "(3.1B parameters)" in table[0] and "--micro-batch 4 " in table[1] and "warning" not in " ".join(table)
    assert table[-1] == f"torchrun --standalone --nproc_per_node=8 train.py --preset med-rlvr --model {args.model} ..."
    assert memory.plan_table(args, gpus=(0, 0.0)).endswith("this machine: no GPU (the plan above is for GPUs)")
    assert "warning: a billion-parameter model without --preset" in memory.plan_table(
        train.parse_args(["--model", args.model]), gpus=(1, 80.0))
    # sft.py --plan: the policy alone (no critic, no reference), its --max-len sequences; its command ends the table
    sft_args = sft.parse_args(["--model", args.model, "--plan"])
    sft_plan, sft_host = memory.memory_plan(config, sft_args, 1, True)
    assert list(sft_plan) == ["held-out decoding (full weights, KV cache)"] and sft_host == pytest.approx(20 * n / 1e9)
    assert "policy (fp32 weights, grads, AdamW)" in memory.memory_plan(config, sft_args, 1, False)[0]
    sft.main(["--model", args.model, "--plan"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == ("flags: --micro-batch 8 --max-len 1024 --eval-batch 64 --max-new-tokens 1024 "
                          "--grad-checkpoint True --precision auto") and "reference" not in printed[2]
    assert memory.plan_table(sft_args, gpus=(2, 80.0)).endswith(
        f"torchrun --standalone --nproc_per_node=2 sft.py --model {args.model} ...")
    train.main(["--preset", "med-rlvr", "--model", str(tmp_path / "3b"), "--plan", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[:-2] == table[:-3] and not (tmp_path / "out").exists()        # (the last: this machine's GPUs)


def test_train_ppo_raises_the_reward_of_the_demo_base(one_rank):
    """The demo, fast: the shipped base, then PPO with the demo's settings on half its rollout batch for 8 steps
    (PPO_RAISES_ARGV, run by the one-process launch). The reward must rise, from the reward alone (measured: -0.16
    over the first 3 steps, +0.26 over steps 6-8)."""
    rows = _metrics(_await(one_rank, "ppo/final"))
    rewards = [r["reward"] for r in rows if "reward" in r]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards


# The tests that wait for the 2-rank launch (two_ranks) come last in this block: it runs beside the ones above.

@pytest.mark.parametrize("kind", FSDP_KINDS)
def test_train_fsdp_two_ranks_equal_one_process(tmp_path, kind, two_ranks):
    """_worker's step (PPO updates with every loss averaging, whitening, a NaN on one rank; SFT; uneven decoding)
    sharded over 2 ranks under torchrun, against the same step in this process as one."""
    ckpt = two_ranks["root"] / "fsdp" / "m"
    _worker(kind, ckpt, tmp_path / "single.safetensors")
    a, b = load_file(tmp_path / "single.safetensors"), load_file(two_ranks["root"] / "fsdp" / f"{kind}.safetensors")
    if kind == "rollout":
        assert torch.equal(a["responses"], b["responses"])
        assert (a["responses"] == -1).any(), "no row stopped early: the test would not exercise uneven decoding"
        return
    if kind == "ppo":
        assert a["nan_step_skipped"].item() == b["nan_step_skipped"].item() == 1.0
        for name in ("whiten.const", "whiten.random"):
            assert torch.isfinite(b[name]).all() and (a[name] - b[name]).abs().max() <= 1e-5, name
    before = load_file(ckpt / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], before[k]) for k in before)          # the step did change the weights
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("world, advantage", [(1, "gae"), (1, "grpo"), (1, "rloo"), (1, "reinforce++"),
                                              *[(2, a) for a in TWO_RANK_RESUMES]])
def test_train_resume_equals_uninterrupted_run(world, advantage, request):
    """Also under torchrun with 2 ranks: sharded optimizer state saved in full, read back by every rank; for every
    estimator (the critic-free ones build, step and save no critic); and in the GPU's bf16 configuration, through
    rollout, experience, update, checkpoint and resume, where everything written must also be finite."""
    extra = ESTIMATOR_ARGV[advantage]                      # the runs: by the one-process or the torchrun launch
    if world == 1:                                         # done once its first half was kept and it ran to the end
        tmp_path = _await(request.getfixturevalue("one_rank"), f"resume-{advantage}/first-half",
                          f"resume-{advantage}/resumed/final")
    else:
        tmp_path = request.getfixturevalue("two_ranks")["root"] / f"resume-{advantage}"
    ckpt = tmp_path / "resumed" / "checkpoint"
    import torch.distributed.checkpoint as dcp
    saved = {k.split(".")[0] for k in dcp.FileSystemReader(ckpt / "weights").read_metadata().state_dict_metadata}
    assert saved == ({"actor", "critic"} if advantage.startswith("gae") else {"actor"})
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(ckpt / "weights", tmp_path / "checkpoint.pt")    # weights and AdamW states, all finite
    assert common.non_finite(torch.load(tmp_path / "checkpoint.pt", weights_only=True)) is None

    def metrics(run):
        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in rows]
    straight, resumed = metrics("straight"), metrics("resumed")
    n = _resume_steps(advantage)
    evals = [0, 2, n] if "--eval-every" in extra else [0, n]            # eval rows, and one row per step
    assert [r["step"] for r in straight] == sorted([*range(1, n + 1), *evals])
    assert all(v is not None for r in straight + resumed for v in r.values())    # a NaN would be written as null
    if "bf16" in advantage:                   # bf16 decoding really ran: its log-probs are off the training forward's
        assert straight[1]["sampler_logprob_err"] > 1e-5
    # the resumed run re-evaluates nothing at step 0 and keeps the first run's rows up to its checkpoint
    assert len(resumed) == len(straight)
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    a, b = load_file(tmp_path / "straight" / "final" / "model.safetensors"), \
        load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    half = load_file(tmp_path / "first-half" / "model.safetensors")
    assert any(not torch.equal(a[k], half[k]) for k in a)             # the last step did something
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k
    assert common.non_finite(a) is None
    assert not (tmp_path / "resumed" / "checkpoint.tmp").exists()


def test_train_takes_hub_ids_offline_from_the_cache(tmp_path, two_ranks):
    """`--model org/tiny --train-data org/medqa` with HF_HUB_OFFLINE=1 and a hand-built cache: 2 ranks under torchrun
    train from the cached files (the split's file found by name), and record where they came from; an id that is not
    cached stops before anything is written, in one line that names it and what to do."""
    hub, run = two_ranks["hub"], two_ranks["root"] / "hub" / "run"
    recorded = json.loads((run / "args.json").read_text())
    assert recorded["model"] == str(hub["snapshot"])                  # the files' names, not their blobs' hashes
    assert recorded["train_data"] == str(hub["questions"] / "data" / "train-00000.jsonl")
    assert recorded["eval_data"] == str(hub["questions"] / "data" / "test-00000.jsonl")
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1]
    argv = hub["argv"]
    r = subprocess.run([sys.executable, "train.py", *argv[:1], "org/missing", *argv[2:], "--out",
                        str(tmp_path / "never")], cwd=ROOT, env=hub["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and not (tmp_path / "never").exists()
    assert re.fullmatch(r"error: org/missing: not in the Hugging Face cache .*give a local path\n", r.stderr), r.stderr


def test_train_sigterm_to_one_rank_checkpoints_and_stops_all(two_ranks, capsys, monkeypatch):
    """A scheduler's SIGTERM reaching one worker of two (rank 1, once the first step's metrics are written; the
    launch's "sigterm" job): both finish the step and stop with the signal's exit code, saying how to resume; one
    checkpoint is written, at the last step done; --resume continues it, with the same number of processes."""
    out = two_ranks["root"] / "sigterm" / "run"
    stops = [json.loads((out.parent / f"stopped-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(s["code"] == 128 + 15 and "--resume" in s["message"] and "SIGTERM" in s["message"] for s in stops)
    steps = [r["step"] for r in _metrics(out) if "reward" in r]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == steps[-1] < 400
    assert not (out / "final").exists() and _unlocked(out)
    # the command line exits with that code and the message, in one line
    monkeypatch.delenv("RANK", raising=False)                      # (under torchrun cli would leave by os._exit)
    with pytest.raises(SystemExit) as stop:
        common.cli(lambda: (_ for _ in ()).throw(common.Abort(stops[0]["message"], stops[0]["code"])))
    assert stop.value.code == 143 and capsys.readouterr().err == f"stopped: {stops[0]['message']}\n"
    # resuming needs the same number of processes (the data split and the samplers' seeds follow the rank)
    argv = json.loads((out / "args.json").read_text())
    _mistake(lambda: train.main(_ppo_argv(argv["model"], out, 400, "--save-every", "1000", "--eval-limit", "2",
                                          "--resume")), "written by 2 processes, this run has 1")


# ================================================================================================================
# common.py: processes, hub ids
# ================================================================================================================

def test_common_from_hub_reads_the_cache_before_the_network(tmp_path, monkeypatch):
    """A cached id is used without asking the network (with HF_HUB_OFFLINE unset, on a machine that has none); an id
    missing from the cache is fetched, and one that can be neither is one line naming it."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    make_demo_like_checkpoint(tmp_path / "tiny")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot = _hub_cache(tmp_path / "hf", "org/tiny", {f.name: f for f in (tmp_path / "tiny").iterdir()})
    data_snap = _hub_cache(tmp_path / "hf", "org/qa", {"data/test-0.jsonl": json.dumps(MEDQA_ROW)}, "dataset")
    asked, real = [], hub.snapshot_download

    def snapshot_download(repo, local_files_only=False, **kw):
        if not local_files_only:
            asked.append(repo)
            raise OSError("no network here")
        return real(repo, local_files_only=True, cache_dir=constants.HF_HUB_CACHE, **kw)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    assert common.from_hub("org/tiny", "model") == str(snapshot)
    assert common.from_hub("org/qa", "data", "test") == str(data_snap / "data" / "test-0.jsonl")
    assert asked == []                                                     # the cache answered: no network asked
    with pytest.raises(ValueError, match=r"^org/qa: no files for split 'train' .*not fetched: no network here"):
        common.from_hub("org/qa", "data", "train")                          # another split: fetched, and it fails
    with pytest.raises(ValueError, match=r"^org/none: not in the Hugging Face cache .*no network here"):
        common.from_hub("org/none", "model")
    assert asked == ["org/qa", "org/none"]


# ================================================================================================================
# data.py: MedQA / MMLU-Pro files, bad rows, the prompt, the tokenizer
# ================================================================================================================

# -----------------------------------------------------------------------------
# MedQA

@pytest.mark.parametrize("split, n", [("dev", 1272), ("test", 1273)])
def test_data_medqa_real_split(split, n):
    need(MEDQA)
    path = MEDQA / f"{split}.jsonl"
    examples, raw = data.load_medqa(path), raw_rows(path)
    assert len(examples) == n == len(raw)
    for ex, row in zip(examples, raw):
        assert list(ex.options) == ["A", "B", "C", "D"]
        assert ex.answer in ex.options
        assert ex.options[ex.answer] == row["answer"]  # the letter points at the released answer text
        assert ex.question == row["question"]
        assert ex.category == row["meta_info"]
    assert {ex.category for ex in examples} >= {"step1", "step2&3"}


# -----------------------------------------------------------------------------
# MMLU-Pro

def test_data_mmlu_pro_health_file():
    need(MMLU_PRO)
    path = MMLU_PRO / "health_test.jsonl"
    examples, raw = data.load_mmlu_pro(path), raw_rows(path)
    assert len(examples) == 818 == len(raw)
    for ex, row in zip(examples, raw):
        n = len(row["options"])
        assert list(ex.options) == [chr(ord("A") + i) for i in range(n)]  # contiguous from A
        assert list(ex.options.values()) == row["options"]  # same order as released
        assert ex.answer == row["answer"] and ex.category == row["src"]


def test_data_mmlu_pro_category_filter_matches_health_file():
    need(MMLU_PRO)
    everything = data.load_mmlu_pro(MMLU_PRO / "test.jsonl")
    health = data.load_mmlu_pro(MMLU_PRO / "test.jsonl", category="health")
    assert len(everything) == 12032 and len(health) == 818
    reference = data.load_mmlu_pro(MMLU_PRO / "health_test.jsonl")
    assert [(e.question, e.options, e.answer) for e in health] == \
           [(e.question, e.options, e.answer) for e in reference]


def test_data_mmlu_pro_uses_answer_letter_not_answer_index():
    need(MMLU_PRO)
    path = MMLU_PRO / "test.jsonl"
    examples, raw = data.load_mmlu_pro(path), raw_rows(path)
    assert [ex.answer for ex in examples] == [row["answer"] for row in raw]
    # the known quirk exists in the file (else this test checks nothing) and did not crash the loader
    disagree = [row["question_id"] for row in raw if row["answer"] != "ABCDEFGHIJ"[row["answer_index"]]]
    assert disagree == [3983]


def test_data_mmlu_pro_drops_na_padding():
    need(MMLU_PRO)
    path = MMLU_PRO / "validation.jsonl"
    for ex, row in zip(data.load_mmlu_pro(path), raw_rows(path)):
        real = [o for o in row["options"] if o != "N/A"]
        assert list(ex.options.values()) == real
        assert ex.options[ex.answer] == row["options"][row["answer_index"]]


# -----------------------------------------------------------------------------
# bad input (synthetic files, no ../shared needed)
@pytest.mark.parametrize("loader, good, bad_line", [
    (data.load_medqa, MEDQA_ROW, '{"question": "Q?", "options": {"A": "a"'),                      # bad JSON
    (data.load_medqa, MEDQA_ROW, json.dumps({k: v for k, v in MEDQA_ROW.items() if k != "options"})),
    (data.load_medqa, MEDQA_ROW, json.dumps({**MEDQA_ROW, "answer_idx": "E"})),                    # not an option
    (data.load_medqa, MEDQA_ROW, json.dumps({**MEDQA_ROW, "options": {"A": "a", "C": "c"}})),      # gap in letters
    (data.load_mmlu_pro, MMLU_ROW, "not json"),
    (data.load_mmlu_pro, MMLU_ROW, json.dumps({k: v for k, v in MMLU_ROW.items() if k != "answer"})),
    (data.load_mmlu_pro, MMLU_ROW, json.dumps({**MMLU_ROW, "answer": "D"})),                       # 3 options only
])
def test_data_corrupt_line_names_file_and_line(tmp_path, loader, good, bad_line):
    # line 1 good, line 2 blank (still counts as a line), line 3 corrupt, line 4 good
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(good), "", bad_line, json.dumps(good)])
    with pytest.raises(ValueError, match=r"rows\.jsonl line 3\b"):
        loader(path)
    write_lines(path, [json.dumps(good), "", json.dumps(good)])  # the same file without it loads
    assert len(loader(path)) == 2


def test_data_encodings_empty_files_and_option_counts(tmp_path):
    row = json.dumps(MEDQA_ROW)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (row + "\n").encode() * 2)
    assert len(data.load_medqa(tmp_path / "bom.jsonl")) == 2             # a byte-order mark is fine
    latin = json.dumps({**MEDQA_ROW, "question": "Qu\u00e9?"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "latin.jsonl").write_bytes((row + "\n").encode() * 2 + latin + b"\n")
    with pytest.raises(ValueError, match=r"latin\.jsonl line 3: not UTF-8"):
        data.load_medqa(tmp_path / "latin.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no examples"):
        data.load_medqa(tmp_path / "empty.jsonl")
    eleven = {**MEDQA_ROW, "options": {k: k.lower() for k in "ABCDEFGHIJK"}}
    write_lines(tmp_path / "k.jsonl", [row, json.dumps(eleven)])
    with pytest.raises(ValueError, match=r"k\.jsonl line 2: 11 options"):
        data.load_medqa(tmp_path / "k.jsonl")


def test_data_medqa_options_out_of_order_are_sorted(tmp_path):
    row = {**MEDQA_ROW, "options": {"C": "c", "A": "a", "D": "d", "B": "b"}}
    [ex] = data.load_medqa(write_lines(tmp_path / "rows.jsonl", [json.dumps(row)]))
    assert list(ex.options.items()) == [("A", "a"), ("B", "b"), ("C", "c"), ("D", "d")]


def test_data_schemas_are_detected(tmp_path):
    """One question in every schema we read (jind11's 4- and 5-option MedQA, GBaker's copy, the -hf form, MMLU-Pro)
    comes out as the same Example; the letter of the other MedQA release, and an unknown schema, are one error."""
    q, texts = "Which drug?", ["aspirin", "heparin", "warfarin", "insulin"]
    rows = {"jind11-4": {"question": q, "options": dict(zip("ABCD", texts)), "answer": "warfarin",
                         "answer_idx": "C", "meta_info": "step1"},
            "jind11-5": {"question": q, "options": dict(zip("ABCDE", ["statin"] + texts)), "answer": "warfarin",
                         "answer_idx": "D", "meta_info": "step1"},
            "gbaker": {"question": q, "answer": "warfarin", "options": dict(zip("ABCD", texts)),
                       "meta_info": "step1", "answer_idx": "C", "metamap_phrases": ["drug"]},
            "hf": {"id": 0, "sent1": q, "sent2": "", "ending0": texts[0], "ending1": texts[1], "ending2": texts[2],
                   "ending3": texts[3], "label": 2},
            "mmlu-pro": {"question_id": 1, "question": q, "options": texts, "answer": "C", "answer_index": 2,
                         "cot_content": "", "category": "health", "src": "ori_mmlu-clinical_knowledge"}}
    for name, row in rows.items():
        [ex] = data.load_questions(write_lines(tmp_path / f"{name}.jsonl", [json.dumps(row)]))
        assert ex.question == q and ex.options[ex.answer] == "warfarin", name
        assert list(ex.options.values()) == (["statin"] + texts if name == "jind11-5" else texts), name
    mixed = {**rows["jind11-4"], "answer_idx": "D"}                # the 5-option file's letter in the 4-option one
    with pytest.raises(ValueError, match=r"mixed\.jsonl line 1: .*answer_idx 'D' is option 'insulin'"):
        data.load_questions(write_lines(tmp_path / "mixed.jsonl", [json.dumps(mixed)]))
    with pytest.raises(ValueError, match=r"odd\.jsonl: unknown schema \(fields \['prompt', 'target'\]\); known: "
                                         r"MedQA \(jind11, GBaker\).*MMLU-Pro"):
        data.load_questions(write_lines(tmp_path / "odd.jsonl", [json.dumps({"prompt": q, "target": "C"})]))


@pytest.mark.parametrize("loader", [data.load_medqa, data.load_mmlu_pro])
def test_data_missing_file(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        loader(tmp_path / "nope.jsonl")


def test_data_parquet_needs_pyarrow(tmp_path):
    path = tmp_path / "test.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1 not really parquet")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            data.load_mmlu_pro(path)
        return
    pq.write_table(pa.Table.from_pylist([MMLU_ROW, {**MMLU_ROW, "category": "law"}]), path)
    examples = data.load_mmlu_pro(path, category="health")
    assert len(examples) == 1 and examples[0].options == {"A": "a", "B": "b", "C": "c"}


def test_data_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path)


def test_data_tokenizer_never_pads_or_cuts(tmp_path):
    """A tokenizer.json saved with padding and truncation on: loaded, its batched ids equal one-by-one ids, whole."""
    tok = data.load_tokenizer(demo.SHIPPED_BASE)
    texts = ["A child weighing 7 kg is prescribed ibuprofen.", "Dose?", ""]
    want = [tok.encode(t).ids for t in texts]
    tok.enable_padding(pad_id=0, length=64)
    tok.enable_truncation(max_length=3)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = data.load_tokenizer(tmp_path)
    assert [e.ids for e in again.encode_batch(texts)] == want and len(want[0]) > 3
    assert data.tokenize_pairs(again, [(texts[0], texts[1])], 512) == [(want[0], want[1])]


# -----------------------------------------------------------------------------
# prompt

def test_data_build_prompt():
    ex = data.Example("Which drug blocks cell wall synthesis?",
                      {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone"}, "C", "step1")
    prompt = data.build_prompt(ex)
    assert "Which drug blocks cell wall synthesis?" in prompt
    assert "\nA. Gentamicin\nB. Ciprofloxacin\nC. Ceftriaxone\n" in prompt
    assert prompt.endswith("Assistant: <think>") and prompt.endswith(data.PROMPT_PREFILL)
    assert "Ceftriaxone" not in data.PROMPT_TEMPLATE and "{question}" in data.PROMPT_TEMPLATE


def test_data_build_prompt_mmlu_pro_ten_options():
    need(MMLU_PRO)
    ex = next(e for e in data.load_mmlu_pro(MMLU_PRO / "health_test.jsonl") if len(e.options) == 10)
    lines = data.build_prompt(ex).split("\n")
    option_lines = [line for line in lines if len(line) > 2 and line[1:3] == ". " and line[0] in "ABCDEFGHIJ"]
    assert [line[0] for line in option_lines] == list("ABCDEFGHIJ")
    assert [line[3:] for line in option_lines] == list(ex.options.values())


# -----------------------------------------------------------------------------
# tokenizer
def test_data_tokenizer_matches_llamacpp_vectors():
    need(QWEN)
    tok = data.load_tokenizer(QWEN)  # the folder form
    cases = read_llamacpp_vectors(QWEN / "llamacpp-vectors")
    assert len(cases) == 46
    # sanity on the splitting: whitespace-only strings are kept exactly
    assert ("", []) in cases and ("\n", [198]) in cases and ("\t\n", [1572]) in cases
    failures = [(text, tok.encode(text).ids, want) for text, want in cases if tok.encode(text).ids != want]
    assert failures == []


def test_data_tokenizer_special_tokens_and_decode():
    need(QWEN)
    tok = data.load_tokenizer(QWEN / "tokenizer.json")  # the file form
    ids = tok.encode("Hello world<|endoftext|>").ids
    assert ids == [9707, 1879, 151643]
    assert data.eos_token_id(tok) == 151643 == ids[-1]
    assert data.decode(tok, ids) == "Hello world<|endoftext|>"  # kept by default, for the reward
    assert data.decode(tok, ids, skip_special_tokens=True) == "Hello world"
    assert tok.decode(ids) == "Hello world"  # why data.decode exists: the library default drops it


# ================================================================================================================
# demo.py: the miniature's task, rules, corpus, tokenizer and base
# ================================================================================================================

def test_demo_corpus_has_the_documented_mix():
    """The demo base model's corpus: each form in its documented share, labelled by reward.classify as documented
    (and scored as a base model's answer would be), 40% right, a quarter from the out-of-distribution family."""
    corpus = demo.corpus(4000)
    label_of = {"concise": CONCISE, "verbose": VERBOSE, "answer_first": DIRECT_ANSWER,
                "outside": REASONING_OUTSIDE, "broken": FORMAT_FAILURE}
    texts = [data.PROMPT_PREFILL + r for _, r, _ in corpus]
    options = [dict(re.findall(r"\n([A-D])\. (\d+ mg)", p)) for p, _, _ in corpus]
    labels = Counter(classify(t, o) for t, o in zip(texts, options))
    for form, share in demo.FORM_SHARES.items():
        assert labels[label_of[form]] / len(corpus) == pytest.approx(share, abs=0.025), form
    right = [("*" in r.split("=")[0]) for _, r, _ in corpus]
    assert sum(right) / len(corpus) == pytest.approx(demo.RIGHT_SHARE, abs=0.025)
    assert sum("tablets" in p for p, _, _ in corpus) / len(corpus) == pytest.approx(demo.OOD_SHARE, abs=0.005)
    for (p, r, form), t in zip(corpus[:200], texts):                        # broken and outside forms earn -1
        gold = re.search(r"<answer>([A-D])", r)
        assert (score(t, "A") == -1.0) == (form in ("broken", "outside")), (form, r)
        assert form in ("broken", "outside") or gold


def test_demo_gold_letters_are_balanced_in_every_set():
    """Each letter exactly a quarter of every demo set (RL / SFT training, both held-out families, the base's
    corpus): a constant answer scores 25.0 %; and every block of 4 consecutive questions holds each letter once."""
    sets = [demo.questions("train"), demo.questions("train", family="tablets"), *demo.held_out().values(),
            demo.make_questions(22500, demo.SEEDS["base"])]
    for qs in sets:
        counts = Counter(q.answer for q in qs)
        assert set(counts) == set("ABCD") and len(set(counts.values())) == 1, counts
        assert all(sorted(q.answer for q in qs[i:i + 4]) == list("ABCD") for i in range(0, len(qs), 4))
        for q in qs[:64]:                                      # the gold is the product, the options 4 distinct
            a, b = demo.numbers(q.question)
            assert q.options[q.answer] == f"{a * b} mg" and len(set(q.options.values())) == 4


def test_demo_reasoning_against_hand_made_responses():
    """The rule of the work written before a response first names an option, and the letter it ends on."""
    q = demo.questions("eval", 4)[0]
    a, b = demo.numbers(q.question)
    assert q.question.startswith(f"A child weighing {a} kg") and f"at {b} mg/kg" in q.question
    r = lambda text: demo.reasoning(q.question, text)                            # noqa: E731
    assert r(f" {a} * {b} = {a * b} mg, option A. </think>\n<answer>B</answer>") == ("right", "B")  # the answer's
    assert r(f"</think> {a} + {b} = {a + b} mg, so the answer is option D.") == ("wrong", "D")      # no answer block
    assert r(f" Option C. {a} * {b} = {a * b} mg. </think>\n<answer>C</answer>") == ("none", "C")   # a guess first
    assert r(f" {a}{a} * {b} = 3 mg, option B.") == ("none", "B")                                 # not its numbers
    assert r(f" {a} + {b} is not it; {a} * {b} = {a * b} mg") == ("right", None)                  # the product
    assert r(" </think>\n<answer>(C)</answer>") == ("none", "C")
    assert demo.reasoning("A 40-year-old man has a fever of 39 C.", " 40 * 39, option A") is None  # not the demo's
    for form in demo.FORMS:                       # the corpus's own responses: its rule, and the letter of its value
        for correct in (True, False):
            rule, letter = r(demo.solution(q, correct, form))
            assert rule == ("none" if form == "answer_first" else "right" if correct else "wrong")
            assert (letter == q.answer) == correct


def test_demo_tokenizer_makes_a_letter_one_token_in_prompt_and_response():
    """An option's letter is the same token after a newline in the prompt and after a space in the response, so the
    base's answer can be a copy of the token before the matching value; numbers stay whole tokens."""
    qs = demo.make_questions(256, 1)
    tok = demo.train_tokenizer([data.build_prompt(q) + demo.solution(q, True) for q in qs])
    q = qs[0]
    text = data.build_prompt(q) + demo.solution(q, True)
    tokens = tok.encode(text).tokens
    assert data.decode(tok, tok.encode(text).ids) == text                                   # lossless
    letter, value = q.answer, "Ġ" + q.options[q.answer].split()[0]
    option = tokens.index(value)                                        # the option's line: "\n", letter, ".", value
    assert tokens[option - 3:option] == ["Ċ", letter, "."]
    work = tokens.index(value, option + 1)                              # the work: "= 20 mg, option", " ", letter
    assert tokens[work:work + 6] == [value, "Ġmg", ",", "Ġoption", "Ġ", letter]
    assert tokens[-6:-4] == [">", letter]                               # <answer>, letter, </answer>


def test_demo_shipped_base_is_the_codes_recipe():
    """demo_base/ (build 0, made by `sft.py --build-base demo_base`) was built by the recipe this code would build
    it with, so the two cannot drift: a change to the task, the corpus, the tokenizer or the training settings
    must rebuild it. It loads, its tokenizer is the demo's, and it fits the 16 MB the repository allows it."""
    base = demo.base_path(0)
    assert base == demo.SHIPPED_BASE and base.parent == ROOT
    assert json.loads((base / "recipe.json").read_text()) == demo.recipe(0)
    assert sum(f.stat().st_size for f in base.iterdir()) <= 16 * 2**20
    net, tok = model.load_model(base), data.load_tokenizer(base)
    q = demo.questions("eval", 1)[0]
    ids = tok.encode(data.build_prompt(q)).ids
    assert len(ids) < 60 and net(torch.tensor([ids])).shape[-1] == net.config.vocab_size == tok.get_vocab_size()
    assert demo.base(0) == base                                              # used as it is, never rebuilt
    _mistake(lambda: demo.base(97), "base build 97 is not built yet; build it first .* sft.py --build-base "
                                    "runs/demo-base-seed97 --base-seed 97")              # never built on the side


def test_demo_shipped_base_has_learned_the_lookup():
    """The premise of the miniature: the shipped base's letter follows its written work (teacher-forced, the letter
    of the option that holds the written value), where a model that has not learned the lookup guesses; and,
    annealed, it does so with a probability of at least 0.9, so that sampled at T = 1 it does too."""
    base, tok = model.load_model(demo.SHIPPED_BASE), data.load_tokenizer(demo.SHIPPED_BASE)
    found = demo.lookup(base, tok, n=100)
    assert min(found.values()) >= 0.9, found                                     # argmax and mean probability
    fresh = demo.lookup(model.init_model(base.config, seed=1), tok, n=100)
    assert max(fresh.values()) <= 0.5 and fresh["product_p"] < 0.01, fresh      # one token of 727: about 1/727
    # In the other forms whose work comes first the probe reads the letter too ("option X" wherever the form puts
    # it): the letter after sum work is the sum's (1.0 measured in each), not a guess at the wrong token
    for form in ("verbose", "outside", "broken"):
        assert demo.lookup(base, tok, n=40, form=form)["sum"] >= 0.9, form


def test_demo_build_trains_until_the_lookup_forms(tmp_path, monkeypatch):
    """A base trains min_epochs passes, then on until demo.lookup passes (checked after every pass from then on), then
    anneals (one more pass, its lr falling to 0: test_sft_anneal_*); a build whose lookup never forms by max_epochs is
    refused with nothing written. A scripted lookup stands in for the real one (which needs thousands of steps), so
    the test checks the stopping rule itself."""
    monkeypatch.setattr(demo, "TRAINING", dict(demo.TRAINING, n_questions=64, min_epochs=2, max_epochs=4))
    asked = []

    def scripted(policy, tok, device="cpu", formed_at=3):
        asked.append(len(asked) + 2)                                        # the epoch it is asked after
        return {"product": 0.95 if asked[-1] >= formed_at else 0.2, "sum": 0.95, "product_p": 0.9, "sum_p": 0.9}
    monkeypatch.setattr(demo, "lookup", scripted)
    logs = []
    demo.build_base(tmp_path / "formed", sft.train, log=logs.append)
    assert asked == [2, 3, 4] and (tmp_path / "formed" / "model.safetensors").is_file()   # formed after epoch 3,
    assert any("after epoch 3" in m and "formed" in m for m in logs)                   # then annealed: 4 passes of
    assert any("sft step 8/8 " in m for m in logs) and "annealed" in logs[-2]         # 2 steps; measured once more
    asked.clear()
    monkeypatch.setattr(demo, "lookup", lambda *a, **k: scripted(*a, **k, formed_at=99))
    with pytest.raises(common.Abort, match="had not formed after 4 epochs"):
        demo.build_base(tmp_path / "never", sft.train, log=logs.append)
    assert asked == [2, 3, 4] and not (tmp_path / "never").exists()


def test_demo_check_prints_the_lookup_and_evaluate_the_reasoning_table(taught_base, tmp_path, capsys):
    """python demo.py DIR prints the teacher-forced lookup (and returns demo.lookup's numbers); evaluate.py --dose with
    --samples reports, for both families, how often each rule's letter is right."""
    found = demo.main([str(taught_base)])
    out = capsys.readouterr().out
    assert f"after product work the letter of the product {found['product']:.1%}" in out
    assert f"its mean probability {found['product_p']:.3f} and {found['sum_p']:.3f}" in out
    assert found == demo.lookup(model.load_model(taught_base), data.load_tokenizer(taught_base))
    evaluate.main(["--model", str(taught_base), "--dose", "8", "--samples", "2", "--max-new-tokens", "24",
                   "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| right rule | its letter right |" in out
    assert f"| {taught_base.name} | Dose (demo) |" in out and f"| {taught_base.name} | Dose, other family (demo) |" in out


def test_demo_ood_family_never_overlaps_training_questions():
    train_qs = demo.make_questions(4096, seed=2)
    ood = demo.make_questions(256, seed=3, family="tablets")
    pairs = lambda qs: {tuple(map(int, re.findall(r"\d+", q.question))) for q in qs}     # noqa: E731
    assert not pairs(train_qs) & pairs(ood)                                  # not even the same two numbers
    assert all("tablets" in q.question and "kg" not in q.question for q in ood)
    assert all("kg" in q.question and "tablets" not in q.question for q in train_qs)
    # the same computation: the right option is the product of the two numbers, one distractor their sum
    for q in ood[:50]:
        a, b = map(int, re.findall(r"\d+", q.question))
        assert q.options[q.answer] == f"{a * b} mg" and f"{a + b} mg" in q.options.values()


def test_demo_study_three_commands_end_to_end(tmp_path, taught_base, monkeypatch):
    """The README's three demo commands with no flags (sft.py, then train.py and evaluate.py shortened), on a tiny
    base model standing in for the shipped one: results.json has the documented shape, and the behaviour and
    reasoning tables are there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "SHIPPED_BASE", Path("demo_base"))
    shutil.copytree(taught_base, "demo_base")
    Path("demo_base/recipe.json").write_text(json.dumps(demo.recipe(seed=1)))   # another recipe:
    _mistake(lambda: sft.main(["--epochs", "1"]), "another version of the demo's recipe")          # refused
    Path("demo_base/recipe.json").write_text(json.dumps(demo.recipe()))   # stands in for the real one
    sft.main(["--epochs", "1", "--batch", "256", "--micro-batch", "256", "--eval-limit", "8"])   # runs/demo-sft
    train.main(["--steps", "2", "--rollout-batch", "8", "--train-batch", "8", "--eval-limit", "8",
                "--max-new-tokens", "24", "--sample-every", "1"])            # runs/demo
    results = evaluate.main(["--dose", "8", "--samples", "3", "--max-new-tokens", "24"])
    saved = json.loads(Path("runs/demo/results.json").read_text())
    assert saved == results and set(saved) == {"base", "sft", "rlvr"}
    for r in saved.values():
        assert set(r) == {"in_distribution", "out_of_distribution"}
        for m in r.values():
            assert set(m) == {"accuracy", "format_rate", "response_length", "sampled_accuracy", "sampled_format_rate",
                              "behaviour", "reasoning", "pass_at_k"} and 0 <= m["accuracy"] <= 1
            # pass@1 is the sampled accuracy; pass@k grows with k
            assert m["pass_at_k"][0] == pytest.approx(m["sampled_accuracy"]) and len(m["pass_at_k"]) == 3
            assert m["pass_at_k"] == sorted(m["pass_at_k"])
            # the rules' shares add up to all 24 responses, and their hits to the sampled accuracy; a reward of +1
            # needs the right letter
            rules = m["reasoning"]
            assert sum(r["share"] for r in rules.values()) == pytest.approx(1.0)
            assert sum(r["share"] * (r["accuracy"] or 0) for r in rules.values()) == pytest.approx(m["sampled_accuracy"])
            assert all((r["accuracy"] or 0) <= (r["letter_right"] or 0) for r in rules.values())
            # 8 questions x 3 samples: every rate is a count of 24, the behaviour shares add up to all 24
            assert all(abs(24 * v - round(24 * v)) < 1e-9 for v in [m["sampled_accuracy"], *m["behaviour"].values()])
            assert sum(m["behaviour"].values()) == pytest.approx(1.0) and set(m["behaviour"]) == set(LABELS)
            assert m["sampled_accuracy"] <= m["sampled_format_rate"]
    report = Path("runs/demo/results.md").read_text()
    assert "| sft |" in report and "reasoning outside" in report and "| base | in distribution |" in report
    assert "does the reasoning pay?" in report and "| rlvr | out of distribution |" in report and "pass@3" in report
    assert len(read_samples("runs/demo/samples.jsonl")) == 16                # every response of both steps
    assert "| rlvr | in distribution |" in study.spread(["runs/demo", "runs/demo"])
    # both trainers logged both held-out families along the way: RLVR's steps and SFT's epoch side by side
    points = study.budget_points(["runs/demo", "runs/demo-sft"])
    assert list(points) == [("rlvr", 0), ("rlvr", 2), ("sft", 1)]
    assert all({"eval_accuracy", "ood_accuracy"} <= set(p) for p in points.values())
    assert [p["questions"] for p in points.values()] == [[0], [16], [4096]]     # 2 steps of 8; 16 batches of 256


# ================================================================================================================
# sft.py: the response-only loss, learning, the HF export
# ================================================================================================================

def test_sft_loss_counts_response_tokens_only():
    """Hand-built batch: changing a prompt token's target logit must not change the loss; the loss equals a
    naive sum of -log p over the response tokens."""
    torch.manual_seed(0)
    config = model.Qwen2Config(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
    net = model.init_model(config)
    pairs = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9])]
    input_ids, loss_mask = sft.collate(pairs, "cpu")
    assert loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    got = sft.response_loss_sum(net, input_ids, loss_mask)
    want = 0.0
    for p, r in pairs:
        logp = torch.log_softmax(net(torch.tensor([p + r]))[0], -1)
        want -= sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(r))
    assert abs(got.item() - want.item()) <= 1e-4


def test_sft_old_flag_name_is_refused_in_one_line(capsys):
    """sft.py's --train is --train-data, as in train.py: the old name stops with one line naming the new one."""
    with pytest.raises(SystemExit):
        sft.parse_args(["--model", "m", "--train", "t"])
    err = capsys.readouterr().err.strip()
    assert "--train is now --train-data" in err and "\n" not in err
    assert "--train " not in sft.make_parser().format_help()                 # hidden from --help


def test_sft_loss_falls_and_the_export_loads_in_transformers(tmp_path, monkeypatch):
    make_demo_like_checkpoint(tmp_path / "base")
    rows = [{"question": f"Which dose is right for case {i}?", "options": {"A": "1 mg", "B": "2 mg", "C": "3 mg",
             "D": "4 mg"}, "answer": f"{i % 4 + 1} mg", "answer_idx": "ABCD"[i % 4], "meta_info": "step1"}
            for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    net = model.load_model(tmp_path / "base").train()
    tok = data.load_tokenizer(tmp_path / "base")
    texts = [sft.medqa_pair(ex) for ex in data.load_medqa(tmp_path / "train.jsonl")]
    losses = sft.train(net, data.tokenize_pairs(tok, texts, 512), epochs=6, batch=8, micro_batch=8, lr=1e-2,
                       warmup=1, log=lambda msg: None)
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2]), losses
    sft.main(["--model", str(tmp_path / "base"), "--train-data", str(tmp_path / "train.jsonl"), "--out",
              str(tmp_path / "sft"), "--epochs", "1", "--batch", "8", "--lr", "1e-3", "--eval-data",
              str(tmp_path / "train.jsonl"), "--eval-limit", "5", "--eval-samples", "2", "--max-new-tokens", "6"])
    ours = model.load_model(tmp_path / "sft")
    # the epoch's row survived the export beside the model, and its numbers are those of the exported model
    [row] = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    held = {"eval": data.load_medqa(tmp_path / "train.jsonl")[:5]}
    assert row == {"epoch": 1, "questions": 16, "response_tokens": sum(len(tok.encode(r).ids) for _, r in texts),
                   **evaluate.held_out_row(ours, tok, held, samples=2, max_new_tokens=6, batch=64)}
    assert {"eval_sampled_accuracy", "eval_sampled_format"} <= set(row)
    assert json.loads((tmp_path / "sft" / "args.json").read_text())["epochs"] == 1
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    x = torch.tensor([tok.encode(texts[0][0]).ids])
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() <= 1e-4
    assert data.load_tokenizer(tmp_path / "sft").get_vocab_size() == tok.get_vocab_size()
    # --offload (FSDP2 with its weights, gradients and AdamW states in host memory, a one-process group here) makes
    # the same model
    shard, offloads = common.shard, []
    monkeypatch.setattr(common, "shard", lambda net, *a: offloads.append(a[-1]) or shard(net, *a))
    sft.main(["--model", str(tmp_path / "base"), "--train-data", str(tmp_path / "train.jsonl"), "--out",
              str(tmp_path / "sft-offload"), "--epochs", "1", "--batch", "8", "--lr", "1e-3", "--offload"])
    offloaded = load_file(tmp_path / "sft-offload" / "model.safetensors")
    assert offloads == [True]                                                    # the flag reached FSDP2
    assert all((offloaded[k] - v).abs().max() <= 1e-5 for k, v in load_file(tmp_path / "sft" / "model.safetensors")
               .items())


def test_sft_resume_equals_uninterrupted_run(tmp_path):
    """sft.py writes a checkpoint after every epoch's row: 1 epoch, then --resume --epochs 2 (through a torn last
    metrics line), ends with the model and rows of 2 epochs straight; a changed trajectory flag is refused."""
    make_demo_like_checkpoint(tmp_path / "base")
    rows = [{**MEDQA_ROW, "question": f"Which dose {i}?", "answer_idx": x, "answer": MEDQA_ROW["options"][x]}
            for i, x in enumerate("ABCD" * 4)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--model", str(tmp_path / "base"), "--train-data", str(tmp_path / "q.jsonl"), "--batch", "8",
             "--lr", "3e-3", "--warmup", "1", "--eval-data", str(tmp_path / "q.jsonl"), "--eval-limit", "4",
             "--max-new-tokens", "6"]
    sft.main([*flags, "--epochs", "2", "--out", str(tmp_path / "straight")])
    sft.main([*flags, "--epochs", "1", "--out", str(tmp_path / "resumed")])
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "quest')                                     # a kill mid-write
    _mistake(lambda: sft.main([*flags, "--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume", "--lr", "1e-3"]),
             "made with --lr 0.003, not --lr 0.001")
    sft.main([*flags, "--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == [1, 2] and resumed == straight
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming the finished run trains nothing more and keeps its rows
    sft.main([*flags, "--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume"])
    assert _metrics(tmp_path / "resumed") == straight
    _mistake(lambda: sft.main([*flags, "--epochs", "1", "--out", str(tmp_path / "resumed"), "--resume"]),
             "after epoch 2, past --epochs 1")


def test_sft_after_epoch_e_is_the_model_of_an_e_epoch_run(tmp_path):
    """sft.py's per-epoch rows stand for shorter runs: after pass 1 of 2 the weights equal a 1-epoch run's, bitwise
    (constant lr after warmup, pass e shuffled by seed + e alone)."""
    tok = make_demo_like_checkpoint(tmp_path / "base")
    pairs = data.tokenize_pairs(tok, [sft.medqa_pair(q) for q in demo.make_questions(27, seed=4)], 512)
    kw = dict(batch=8, micro_batch=4, lr=1e-2, warmup=2, log=lambda msg: None)
    long, seen, counts = model.load_model(tmp_path / "base").train(), {}, []

    def after_epoch(e, *n):                                       # returns None: training goes on
        counts.append(n)
        seen[e] = {k: v.clone() for k, v in long.state_dict().items()}
    sft.train(long, pairs, epochs=2, **kw, after_epoch=after_epoch)
    short = model.load_model(tmp_path / "base").train()
    sft.train(short, pairs, epochs=1, **kw)
    assert list(seen) == [1, 2]
    # what each pass trained on: 3 batches of 8 of the 27 (the last 3 of its shuffle are left out), counted by hand
    tokens = []
    for e in (0, 1):
        order = list(range(27))
        random.Random(e).shuffle(order)
        tokens.append(sum(len(pairs[j][1]) for j in order[:24]))
    assert counts == [(24, tokens[0]), (48, tokens[0] + tokens[1])]
    assert all(torch.equal(seen[1][k], v) for k, v in short.state_dict().items())
    assert not all(torch.equal(seen[2][k], v) for k, v in short.state_dict().items())


def test_sft_anneal_decays_the_lr_to_zero_after_the_stop(tmp_path):
    """With anneal = n, the pass after_epoch stops at is followed by n more, past `epochs` if need be, whose lr falls
    linearly to 0 (warmup-stable-decay: how the demo's base builds); after_epoch is not asked again. The lr of every
    optimizer step, by hand."""
    tok = make_demo_like_checkpoint(tmp_path / "base")
    pairs = data.tokenize_pairs(tok, [sft.medqa_pair(q) for q in demo.make_questions(24, seed=4)], 512)  # 3 steps a pass
    net = model.load_model(tmp_path / "base").train()
    opt, lrs, asked = sft.make_optimizer(net, 1e-2, 0.0), [], []
    step = opt.step
    opt.step = lambda *a, **k: (lrs.append(opt.param_groups[0]["lr"]), step(*a, **k))[1]
    sft.train(net, pairs, epochs=2, batch=8, micro_batch=8, lr=1e-2, warmup=2, log=lambda msg: None, opt=opt,
              after_epoch=lambda e, *_: asked.append(e) or e == 2, anneal=2)
    assert asked == [1, 2]
    assert lrs == pytest.approx([5e-3] + [1e-2] * 5 + [1e-2 * (6 - j) / 6 for j in range(6)])


# ================================================================================================================
# evaluate.py and study.py: scoring, pass@k, the stages, runs compared
# ================================================================================================================

def test_evaluate_fixture_rows_labelled_by_hand(samples):
    rows = read_samples(samples)
    assert len(rows) == len(ROWS)
    for row, (_, _, _, label, _) in zip(rows, ROWS):
        assert classify(row["response"]) == label


def test_evaluate_dynamics_table_per_step(samples):
    table = dynamics_table(read_samples(samples))
    zero = dict.fromkeys(LABELS, 0.0)
    expected = [
        {"step": 1, "n": 3, **zero, FORMAT_FAILURE: 2 / 3, VERBOSE: 1 / 3, "score": -2 / 3, "think_words": 132 / 3},
        {"step": 2, "n": 3, **zero, CONCISE: 2 / 3, DIRECT_ANSWER: 1 / 3, "score": 2 / 3, "think_words": 13 / 3},
        {"step": 3, "n": 2, **zero, REASONING_OUTSIDE: 0.5, DIRECT_ANSWER: 0.5, "score": 0.0, "think_words": 6.5},
    ]
    assert len(table) == 3
    for got, want in zip(table, expected):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want)


def test_evaluate_dynamics_table_buckets(samples):
    table = dynamics_table(read_samples(samples), every=2)
    assert [(t["step"], t["n"]) for t in table] == [(2, 6), (3, 2)]  # steps 1-2 -> labelled 2; step 3 alone
    assert table[0][FORMAT_FAILURE] == pytest.approx(2 / 6) and table[0][CONCISE] == pytest.approx(2 / 6)
    assert table[0]["score"] == pytest.approx(0.0) and table[0]["think_words"] == pytest.approx(145 / 6)
    with pytest.raises(ValueError):
        dynamics_table([], every=0)


def test_evaluate_format_table(samples):
    text = format_table(dynamics_table(read_samples(samples)))
    lines = text.splitlines()
    assert lines[0] == ("| step | n | format failure | reasoning outside | direct answer | verbose | concise "
                        "| score | think words |")
    assert lines[2] == "| 1 | 3 | 67% | 0% | 0% | 33% | 0% | -0.667 | 44.0 |"
    assert lines[4] == "| 3 | 2 | 0% | 50% | 50% | 0% | 0% | 0.000 | 6.5 |"
    assert len(lines) == 5


def test_evaluate_dynamics_bad_input(tmp_path):
    with pytest.raises(ValueError, match="row 1"):
        dynamics_table([{"step": 1, "response": "x", "score": 0.0}, {"step": 2, "score": 1.0}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_samples(bad)
    with pytest.raises(FileNotFoundError):
        read_samples(tmp_path / "missing.jsonl")


def test_evaluate_plot_dynamics(samples, tmp_path):
    table = dynamics_table(read_samples(samples))
    out = tmp_path / "dynamics.png"
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            plot_dynamics(table, out)
    else:
        plot_dynamics(table, out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_pass_at_k_against_enumeration():
    """The unbiased estimator equals the share of all k-subsets of the n responses that hold a right one."""
    import itertools
    for n, c in ((5, 0), (5, 2), (6, 3), (4, 4)):
        answers = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(answers, k))
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_evaluate_demo_study_of_another_base_needs_its_runs(tmp_path, monkeypatch):
    """--base-seed 1 with runs trained from base 0 (the default --sft / --rlvr) would compare models of two bases:
    refused, from the base build each run's args.json records."""
    monkeypatch.chdir(tmp_path)
    for run, seed in (("runs/demo-sft", 0), ("runs/demo", 0), ("runs/b1-sft", 1), ("runs/b1", 1)):
        Path(run).mkdir(parents=True)
        Path(run, "args.json").write_text(json.dumps({"base_seed": seed}))
    _mistake(lambda: evaluate.main(["--base-seed", "1", "--rlvr", "runs/b1"]),
             "--sft runs/demo-sft was trained from base build 0, not --base-seed 1")
    _mistake(lambda: evaluate.main(["--base-seed", "1", "--sft", "runs/b1-sft"]), "--rlvr runs/demo was trained from")
    _mistake(lambda: evaluate.main(["--base-seed", "1", "--sft", "runs/b1-sft", "--rlvr", "runs/b1"]),
             "runs/demo-base-seed1: no base model")                   # past the check, to the missing base


def test_evaluate_under_torchrun_equals_one_process(tmp_path, two_ranks):
    """evaluate.py with 2 ranks, each decoding its share of the batches: the same results file as one process, the
    sampled accuracy included (each batch has its own seeded generator)."""
    ckpt = two_ranks["root"] / "evaluate" / "m"
    one = evaluate.main([*_evaluate_argv(ckpt), "--out", str(tmp_path / "one.json")])
    assert json.loads((two_ranks["root"] / "evaluate" / "two.json").read_text()) == json.loads(json.dumps(one))
    assert one[str(ckpt)]["Dose (demo)"]["n"] == 12


def test_evaluate_budgets_by_hand(tmp_path):
    """Two RLVR seeds and one SFT run, metrics written by hand: one row per evaluated step and epoch, questions and
    response tokens seen, accuracies as mean ± sample std over the runs."""
    def run(name, args, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps(args))
        write_lines(tmp_path / name / "metrics.jsonl", [json.dumps(r) for r in rows])
    for seed, (a0, a2) in enumerate([(0.1, 0.3), (0.1, 0.5)]):
        run(f"rl{seed}", {"advantage": "gae", "rollout_batch": 4, "samples_per_prompt": 2, "seed": seed},
            [{"step": 0, "eval_accuracy": a0, "eval_sampled_accuracy": a0 / 2},
             {"step": 1, "reward": 0, "response_length": 10.0}, {"step": 2, "reward": 0, "response_length": 20.0},
             {"step": 2, "eval_accuracy": a2, "eval_sampled_accuracy": a2 / 2}])
    run("sft", {"epochs": 1}, [{"epoch": 1, "questions": 16, "response_tokens": 64, "eval_accuracy": 0.25}])
    points = study.budget_points([tmp_path])
    assert list(points) == [("rlvr", 0), ("rlvr", 2), ("sft", 1)]          # seeds are repeats, pooled
    assert points[("rlvr", 2)] == {"questions": [8, 8], "response_tokens": [240.0, 240.0], "eval_accuracy": [0.3, 0.5],
                                   "eval_sampled_accuracy": [0.15, 0.25]}
    lines = study.budget_table(points).splitlines()
    assert lines[2] == "| rlvr | step 0 (the base) | 2 | 0 | 0 | 10.0 ± 0.0 | 5.0 ± 0.0 |"
    assert lines[3] == f"| rlvr | 2 steps | 2 | 8 | 240 | 40.0 ± {100 * 0.02 ** 0.5:.1f} | 20.0 ± 7.1 |"
    assert lines[4] == "| sft | 1 epoch | 1 | 16 | 64 | 25.0 |  |"                  # one run: no spread
    run("sft-lr", {"epochs": 2, "lr": 0.1}, [{"epoch": 1, "questions": 8, "response_tokens": 32, "ood_accuracy": 0.5}])
    (tmp_path / "sft" / "args.json").write_text(json.dumps({"epochs": 1, "lr": 0.2}))   # differ: not pooled
    assert list(study.budget_points([tmp_path]))[2:] == [("sft (lr=0.1)", 1), ("sft (lr=0.2)", 1)]
    with pytest.raises(FileNotFoundError, match="no run folder"):
        study.budget_points([tmp_path / "rl0" / "args.json"])


def test_evaluate_compare_runs_by_hand(tmp_path):
    """Two seeds of two estimators, metrics written by hand: mean ± sample std per evaluated step, wall time as
    the sum of step times, peak memory as the largest row."""
    def run(name, advantage, seed, evals, times, mems, n=1):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps(
            {"advantage": advantage, "seed": seed, "rollout_batch": 64 // n, "samples_per_prompt": n}))
        rows = [{"step": 0, "eval_accuracy": evals[0]}]
        rows += [{"step": i + 1, "reward": 0.0, "accuracy": 0.1 * (i + 1), "direct_answer": 0.5 * seed,
                  "time_step": t, "peak_mem_mb": m} for i, (t, m) in enumerate(zip(times, mems))]
        rows += [{"step": len(times), "eval_accuracy": evals[1]}]
        write_lines(tmp_path / name / "metrics.jsonl", [json.dumps(r) for r in rows])
    run("gae-0", "gae", 0, (0.0, 0.30), (1.0, 2.0), (100, 120))
    run("gae-1", "gae", 1, (0.0, 0.40), (2.0, 2.0), (110, 100))
    run("grpo-0", "grpo", 0, (0.0, 0.50), (1.0, 1.0), (90, 95), n=4)
    groups = study.compare_runs(tmp_path)
    assert groups["gae"]["eval"] == {0: [0.0, 0.0], 2: [0.3, 0.4]} and groups["gae"]["wall_s"] == [3.0, 4.0]
    assert groups["gae"]["peak_mem_mb"] == [120, 110] and groups["grpo"]["responses_per_step"] == 64
    table = study.comparison_table(groups)
    std = 100 * (0.005 ** 0.5) * 1.0                       # sample std of 0.30, 0.40: sqrt(0.005)
    assert f"| gae | 64 | 2 | 0.0 ± 0.0 | 35.0 ± {std:.1f} | 4 ± 1 | 115 ± 7 |" in table, table
    assert "| grpo | 64 | 1 | 0.0 ± 0.0 | 50.0 ± 0.0 | 2 ± 0 | 95 ± 0 |" in table, table
    # per 2 steps: accuracy (0.1 + 0.2) / 2 over both seeds, direct answer (0 + 0.5) / 2 for gae, 0 for grpo
    assert "| 1-2 | 15.0% | 25.0% | 15.0% | 0.0% |" in study.training_table(groups, every=2)
    with pytest.raises(FileNotFoundError, match="no run folder"):
        study.compare_runs(tmp_path / "gae-0" / "nothing")
    # runs that differ in another flag are labelled by it (the ablation)
    run("abl-0", "gae", 0, (0.0, 0.2), (1.0, 1.0), (90, 95))
    args = json.loads((tmp_path / "abl-0" / "args.json").read_text())
    (tmp_path / "abl-0" / "args.json").write_text(json.dumps({**args, "incorrect_reward": -1.0}))
    for name in ("gae-0", "gae-1"):
        args = json.loads((tmp_path / name / "args.json").read_text())
        (tmp_path / name / "args.json").write_text(json.dumps({**args, "incorrect_reward": 0.0}))
    labels = set(study.compare_runs([tmp_path / "gae-0", tmp_path / "gae-1", tmp_path / "abl-0"]))
    assert labels == {"incorrect_reward=0.0", "incorrect_reward=-1.0"}


def test_evaluate_scores_with_the_reward_rules(tmp_path, monkeypatch):
    """Scripted responses: accuracy, format rate, letters and per-category accuracy follow reward.parse."""
    examples = demo.make_questions(4, seed=5)
    wrong = next(k for k in examples[1].options if k != examples[1].answer)
    scripted = [f" x </think><answer>{examples[0].answer}</answer>", f" x </think><answer>{wrong}</answer>",
                " no closing tag", f" x </think><answer>({examples[3].answer})</answer><|endoftext|>"]
    monkeypatch.setattr(evaluate, "run_model", lambda *a, **k: [([1] * (i + 1), s) for i, s in enumerate(scripted)])
    got = evaluate.evaluate_one(None, None, examples, max_new_tokens=8, batch=4)
    assert got["accuracy"] == 2 / 4 and got["format_rate"] == 3 / 4 and got["response_length"] == 2.5
    assert got["letters"] == dict(sorted(Counter([examples[0].answer, wrong, "none", examples[3].answer]).items()))
    assert got["per_category"] == {"dose": 0.5}
    assert evaluate.read_answer("The drug blocks the wall.\nThe answer is (C).", "cot") == (True, "C")
    assert evaluate.read_answer(" B. Ceftriaxone\nQuestion: next", "direct") == (True, "B")


def test_evaluate_two_models_on_real_questions(tmp_path):
    for f in (MEDQA / "test.jsonl", MMLU_PRO / "health_test.jsonl", QWEN / "tokenizer.json"):
        need(f)
    for name, seed in (("base", 0), ("rl", 1)):
        config = model.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model.save_model(model.init_model(config, seed), tmp_path / name)
        shutil.copy(QWEN / "tokenizer.json", tmp_path / name / "tokenizer.json")
    results = evaluate.main(["--model", str(tmp_path / "base"), str(tmp_path / "rl"), "--medqa",
                             str(MEDQA / "test.jsonl"), "--mmlu-pro", str(MMLU_PRO / "health_test.jsonl"),
                             "--limit", "3", "--max-new-tokens", "6", "--out", str(tmp_path / "results.json")])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for m in saved.values():
        assert set(m) == {"MedQA", "MMLU-Pro-Health"}
        for r in m.values():
            assert r["n"] == 3 and 0 <= r["accuracy"] <= r["format_rate"] <= 1 and 1 <= r["response_length"] <= 6
    table = (tmp_path / "results.md").read_text()
    assert "| | base | rl |" in table and "MMLU-Pro-Health accuracy (greedy)" in table


# ================================================================================================================
# gpu_report.py (bench.py --device): the GPU report in miniature
# ================================================================================================================

def test_gpu_report_twin_models_are_one_model():
    """bench's transformers / ours twins are built from one config (Qwen2.5's rope theta included) and agree in
    fp32: the GPU report's bf16 gap is then bf16's alone."""
    hf, ours = gpu_report.twin_models("tiny", 1000, torch.float32, "cpu")
    assert ours.config.rope_theta == 1e6 == hf.config.rope_parameters["rope_theta"]
    x = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_gpu_report_runs_in_miniature_on_cpu(one_rank):
    """`bench.py --device cpu --tiny` (run by the one-process launch): the GPU report's four sections run on a CPU
    and their numbers land in the JSON report; the training smoke run passes its three checks (finite, resume
    exact, graph tokens equal)."""
    root, launch = one_rank
    _finished(root, launch)                                             # the launch's last job
    report = json.loads((root / "gpu.json").read_text())
    assert list(report) == ["machine", "parity", "rollout", "ppo", "training", "verdict"]
    assert not [k for k, v in report.items() if "error" in v]
    assert report["parity"]["twins_fp32_max_err"] <= 1e-4 and report["parity"]["bf16_head"]["logprob_err"] <= 1e-5
    assert report["parity"]["bf16_head"]["ok"] and report["parity"]["ok"]
    assert "cudnn" not in str(report["parity"]["attention_kernels"])
    assert report["rollout"]["graph_ok"] and report["rollout"]["graph_logprob_err"] <= gpu_report.BF16_LOGPROB_TOL
    for run in ("--cuda-graphs off", "--cuda-graphs on"):
        assert report["training"][run]["finite"] and report["training"][run]["resume_exact"]
    assert report["verdict"] == {"parity": True, "rollout": True, "ppo": True, "training": True}


def test_gpu_report_graph_divergence_tells_a_near_tie_from_a_wrong_path():
    """Two paths fed the same uniforms may differ at a near tie of the inverse CDF, never by more: the check passes
    the static step against the default one, and fails a path that decodes from the wrong distribution."""
    _, ours = gpu_report.twin_models("tiny", 1000, torch.bfloat16, "cpu")
    prompts = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(1)).tolist()

    def run(static=False, temperature=1.0):
        return rollout.generate(ours, prompts, 12, temperature=temperature, eos_token_id=1001,
                                generator=torch.Generator().manual_seed(0), static=static)
    uniforms = rollout.draw_uniforms(12, 4, torch.Generator().manual_seed(0), "cpu")
    same = gpu_report.graph_divergence(ours, prompts, run(), run(static=True), uniforms)
    assert same["ok"] and same["mass_moved"] <= gpu_report.BF16_MASS_TOL
    wrong = gpu_report.graph_divergence(ours, prompts, run(), run(temperature=0.3), uniforms)   # another distribution
    assert not wrong["ok"] and wrong["logprob_err"] > gpu_report.BF16_LOGPROB_TOL
    # a token far from the draw, with the log-prob p gives it: consistent log-probs, but no near tie
    a = run()
    far = (a.responses[0][0] + 500) % 1000
    with torch.no_grad():
        lp = torch.log_softmax(ours(torch.tensor([prompts[0]]), logits_from=-1)[0, -1].double(), -1)[far]
    forged = rollout.Rollout(responses=[[far]] + a.responses[1:], logprobs=[lp[None].float()] + a.logprobs[1:],
                             finished=a.finished)
    moved = gpu_report.graph_divergence(ours, prompts, a, forged, uniforms)
    assert moved["logprob_err"] <= gpu_report.BF16_LOGPROB_TOL and moved["mass_moved"] > gpu_report.BF16_MASS_TOL


# ================================================================================================================
# helpers
# ================================================================================================================

def make_checkpoint(path, *, tied=True, heads=4, kv_heads=2, hidden=56, layers=2, vocab=97, sharded=False,
                    legacy_config=False, seed=0):
    """A tiny random Qwen2 saved by transformers. Every tensor is randomised (biases and norms too), so a
    forgotten bias or a norm applied in the wrong place shows. legacy_config rewrites config.json in the
    released Qwen2.5 spelling (rope_theta, torch_dtype) instead of transformers 5's (rope_parameters, dtype)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0})   # not the default theta
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    ref.save_pretrained(path, max_shard_size="30KB" if sharded else "5GB")
    if legacy_config:
        c = json.loads((Path(path) / "config.json").read_text())
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["torch_dtype"] = c.pop("dtype", "float32")
        (Path(path) / "config.json").write_text(json.dumps(c))
    return transformers.Qwen2ForCausalLM.from_pretrained(path).eval()   # the reference reads the files we will read


def _reference_valid(text):
    """Independent formulation of the format rule: one regex over the whole text (fine for short texts)."""
    tags = "<think>|</think>|<answer>|</answer>"
    inner = rf"(?:(?!{tags}).)*"  # any text that contains no tag
    blank = r"(?:\s|<\|endoftext\|>|<\|im_end\|>)*"
    return re.fullmatch(rf"{blank}<think>{inner}</think>{blank}<answer>{inner}</answer>{blank}", text, re.S) is not None


def need(path):
    if not path.exists():
        pytest.skip(f"../shared not found: {path} is needed for this test")


def raw_rows(path):
    """Independent reference: the file's rows as plain dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_llamacpp_vectors(folder):
    """llama.cpp's format: each test string is followed by "\\n__ggml_vocab_test__\\n" in the .inp file
    (so the string loses exactly the newline before the separator line); the .out file has one line of
    space-separated expected ids per string (empty line for the empty string)."""
    inp = (folder / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    out = (folder / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""  # the file ends with a separator
    ids = [[int(t) for t in line.split()] for line in out.split("\n")]
    assert ids[-1] == []  # trailing newline
    return list(zip(texts[:-1], ids[:-1], strict=True))


def ragged(lengths, T, seed=0):
    """Random [B, T] float tensors with right padding filled with garbage, plus the mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    x = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    return torch.where(mask.bool(), x, torch.full_like(x, GARBAGE)), mask


def naive_gae(rewards, values, n, gamma, lam):
    """Per-row GAE over the first n entries, pure Python floats."""
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values[:n])]


def make_demo_like_checkpoint(path, seed=0):
    """A tiny random policy with a small tokenizer trained on dose-question text (seconds to make)."""
    questions = demo.make_questions(200, seed=1)
    texts = [data.build_prompt(q) + demo.solution(q, True) for q in questions]
    tok = demo.train_tokenizer(texts)
    config = model.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True, torch_dtype="float32")
    model.save_model(model.init_model(config, seed), path)
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok


def _fixed_experience(vocab, n=6, seed=0):
    """A fixed batch of PPO experience: prompts and responses of unequal lengths, random advantages etc."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(0, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    rows = [dict(old_logprobs=-3 + 0.3 * torch.randn(len(r), generator=g), values=torch.randn(len(r), generator=g),
                 advantages=torch.randn(len(r), generator=g), returns=torch.randn(len(r), generator=g),
                 ref_logprobs=-3 + 0.3 * torch.randn(len(r), generator=g))
            for r in responses]
    return prompts, responses, rows


def _experience_for(prompts, responses, rows):
    input_ids, attn, mask, P = train.pack(prompts, responses, "cpu")
    per_token = {}
    for k in rows[0]:
        per_token[k] = torch.zeros_like(mask)
        for i, row in enumerate(rows):
            per_token[k][i, :len(row[k])] = row[k]
    return train.Experience(input_ids, attn, mask, P, **per_token, texts=[""] * len(rows), scores=[0.0] * len(rows))


def _worker(kind, ckpt, out):
    """One optimizer step on fixed data (in the 2-rank launch, or in pytest's process as one); rank 0 saves the
    weights."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    actor = common.shard(model.load_model(ckpt).train(), world)
    vocab = actor.config.vocab_size
    if kind == "ppo":
        critic = common.shard(model.load_model(ckpt, value_head=True).train(), world)
        prompts, responses, rows = _fixed_experience(vocab)
        mine = list(range(rank, len(prompts), world))
        exp = _experience_for([prompts[i] for i in mine], [responses[i] for i in mine], [rows[i] for i in mine])
        # SGD, not Adam: Adam turns the ~1e-9 rounding noise of a zero gradient (k_proj.bias) into a full step
        opts = [torch.optim.SGD(net.parameters(), lr=0.5) for net in (actor, critic)]
        hyper = dict(micro_batch=2, temperature=0.7, clip=0.2, value_clip=0.2, grad_clip=1.0, loss_agg="token",
                     world=world)
        assert train.ppo_update(actor, critic, *opts, exp, list(range(len(mine))), **hyper)["skipped"] == 0.0
        for agg in ("seq", "fixed"):          # the other averagings, weighted across micro-batches and ranks alike
            assert train.ppo_update(actor, critic, *opts, exp, list(range(len(mine))),
                                    **{**hyper, "loss_agg": agg}, horizon=5)["skipped"] == 0.0
        # the critic-free update: the actor alone, with the KL to the reference as a loss term (GRPO's k3)
        assert train.ppo_update(actor, None, opts[0], None, exp, list(range(len(mine))), kl_coef=0.1,
                                kl_estimator="k3", **hyper)["skipped"] == 0.0
        # a NaN in rank 0's advantages only: every rank must skip the step (the weights stay as they are)
        if rank == 0:
            exp.advantages[0, 0] = float("nan")
        skipped = train.ppo_update(actor, critic, *opts, exp, list(range(len(mine))), **hyper)["skipped"]
        state = {**common.full_state_dict(actor, world),
                 **{"critic." + k: v for k, v in common.full_state_dict(critic, world).items()},
                 "nan_step_skipped": torch.tensor([skipped])}
        # cross-rank whitening equals one process's, also for advantages that are all equal (65,536 tokens of 0.7,
        # where E[x^2] - mean^2 comes out negative)
        g = torch.Generator().manual_seed(3)
        for name, x in (("const", torch.full((8, 8192), 0.7)), ("random", torch.randn(8, 16, generator=g))):
            mask = (torch.arange(x.shape[1]) < torch.arange(8, 0, -1)[:, None] * x.shape[1] // 8).float()
            shares = [train.whiten(x[rank::world], mask[rank::world], world)]
            if world > 1:
                shares = [None] * world
                torch.distributed.all_gather_object(shares, train.whiten(x[rank::world], mask[rank::world], world))
            state["whiten." + name] = torch.stack([shares[i % world][i // world] for i in range(8)])
    elif kind == "rollout":
        # ranks decode different prompts for different numbers of steps (each row stops at its own EOS):
        # under full_weights that needs no collective, so nothing may hang, and the tokens equal one process's
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, vocab, (1 + i % 5,), generator=g).tolist() for i in range(6)]
        with common.full_weights(actor) as plain:
            assert not common.is_sharded(plain)                  # decoding runs no FSDP hooks
            result = rollout.generate(plain, prompts[rank::world], 12, temperature=0, eos_token_id=[3, 10, 20, 40])
        shares = [result.responses]
        if world > 1:
            shares = [None] * world
            torch.distributed.all_gather_object(shares, result.responses)
        responses = [shares[i % world][i // world] for i in range(len(prompts))]
        state = {"responses": torch.tensor([r + [-1] * (12 - len(r)) for r in responses])}
    else:
        g = torch.Generator().manual_seed(1)
        pairs = [(torch.randint(0, vocab, (3 + i % 3,), generator=g).tolist(),
                  torch.randint(0, vocab, (1 + i % 4,), generator=g).tolist()) for i in range(8)]
        sft.train(actor, pairs, epochs=1, batch=8, micro_batch=3, lr=1e-2, warmup=1, rank=rank, world=world,
                  opt=torch.optim.SGD(actor.parameters(), lr=1e-2))     # SGD: as ppo's, a wrong scale would show
        state = common.full_state_dict(actor, world)
    if rank == 0:
        save_file({k: v.detach().clone() for k, v in state.items()}, out)


def _launch(root: Path, jobs: list, torchrun: bool, env=None) -> subprocess.Popen:
    """Start `python test_all.py root/jobs.json` (_run_jobs), under torchrun with 2 ranks or as one process; its
    output goes to files (a pipe could fill up)."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    with open(root / "stdout", "w") as out, open(root / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, *run, "test_all.py", str(root / "jobs.json")], cwd=ROOT, env=env,
                                stdout=out, stderr=err)


def _finished(root: Path, launch: subprocess.Popen):
    """Wait for a launch; it must have succeeded (else its stderr, less the warnings, is the failure)."""
    launch.wait(timeout=900)
    assert launch.returncode == 0, "\n".join(l for l in (root / "stderr").read_text().splitlines()
                                            if "Warning" not in l and "register_pre" not in l)[-6000:]


def _await(launch: tuple, *names: str) -> Path:
    """Wait until a background launch has written every file or folder `names` (under its folder): a job's last
    output, written whole. A launch that ended without them failed: its error. -> the folder of the first."""
    root, process = launch
    while not all((root / n).exists() for n in names) and process.poll() is None:
        time.sleep(0.2)
    if not all((root / n).exists() for n in names):
        _finished(root, process)
        raise AssertionError(f"the launch in {root} ended without {names}")
    return (root / names[0]).parent


def _run_jobs(jobs):
    """Run jobs one after another in this process: ["train" | "evaluate" | "bench", *argv], ["sigterm", *argv]
    (train.py's, see two_ranks_launch), ["worker", kind, ckpt, out], or ["rename", src, dst] (by rank 0, while the
    others wait). The background launches' work."""
    dist = torch.distributed
    for job, *rest in jobs:
        if job == "train":
            train.main(rest)
        elif job == "evaluate":
            evaluate.main(rest)
        elif job == "bench":
            try:
                bench.main(rest)
            except common.Abort:                     # a section failed: the report's verdict says which (the test
                pass                                 # reads it), and the launch goes on to report success
        elif job == "worker":
            _worker(*rest)
        elif job == "sigterm":                   # train.main, and rank 1 gets SIGTERM once step 1's row is written
            rank = dist.get_rank()
            out = Path(rest[rest.index("--out") + 1])
            if rank == 1:
                threading.Thread(target=_sigterm_after_a_step, args=(out / "metrics.jsonl",), daemon=True).start()
            try:
                train.main(rest)
            except common.Abort as e:            # what common.cli would print, and the exit code it would give
                (out.parent / f"stopped-{rank}.json").write_text(json.dumps({"message": str(e), "code": e.code}))
        elif job == "rename":
            if not dist.is_initialized() or dist.get_rank() == 0:
                Path(rest[0]).rename(rest[1])
            if dist.is_initialized():
                dist.barrier()
        else:
            raise ValueError(f"unknown job {job}")


def _sigterm_after_a_step(metrics: Path):
    """SIGTERM to this process, as a scheduler sends it, as soon as `metrics` holds a PPO step's row."""
    while not (metrics.exists() and '"reward"' in metrics.read_text()):
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)


def _ppo_argv(base, out, steps, *extra):
    return ["--model", str(base), "--out", str(out), "--steps", str(steps), "--rollout-batch", "8",
            "--train-batch", "4", "--micro-batch", "4", "--max-new-tokens", "16", "--eval-limit", "8",
            "--save-every", "2", "--sample-every", "1", "--actor-lr", "1e-2", "--critic-lr", "1e-2", *extra]


def _resume_steps(advantage) -> int:
    """The resume test's length: 2 steps (resumed after 1), or 3 with --eval-every 2 (resumed after 2, where the
    evaluation that the cut dropped must be redone)."""
    return 3 if "--eval-every" in ESTIMATOR_ARGV[advantage] else 2


def _resume_jobs(base, folder, advantage):
    """The resume test's runs (for _run_jobs): n steps straight; n - 1 steps, their export kept as first-half; then
    --resume to n."""
    extra, n = [*ESTIMATOR_ARGV[advantage], "--max-new-tokens", "24"], _resume_steps(advantage)  # 24: a whole answer
    return [["train", *_ppo_argv(base, folder / "straight", n, *extra)],
            ["train", *_ppo_argv(base, folder / "resumed", n - 1, *extra)],
            ["rename", str(folder / "resumed" / "final"), str(folder / "first-half")],
            ["train", *_ppo_argv(base, folder / "resumed", n, "--resume", *extra)]]


# OpenRLHF 0.5.9, transcribed: openrlhf/models/utils.py masked_mean, openrlhf/models/loss.py PolicyLoss and
# ValueLoss, and the lr_lambda of transformers 4.48.2's cosine_with_min_lr (optimization.py), which 0.5.9's
# train_ppo.py schedules over ceil(num_episodes * len(prompts) * n_samples // train_batch * max_epochs) optimizer
# steps with num_warmup_steps = ceil(max_steps * lr_warmup_ratio) and min_lr = 0.1 * lr.
def _059_masked_mean(tensor, mask, dim=None):
    if dim is not None:
        return (tensor * mask).sum(axis=dim) / mask.sum(axis=dim)
    return (tensor * mask).sum() / mask.sum()


def _059_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps=0.2):
    ratio = (log_probs - old_log_probs).exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.min(surr1, surr2)
    return _059_masked_mean(loss, action_mask, dim=-1).mean()


def _059_value_loss(values, old_values, returns, action_mask, clip_eps=0.2):
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    surr1 = (values_clipped - returns) ** 2
    surr2 = (values - returns) ** 2
    loss = torch.max(surr1, surr2)
    loss = _059_masked_mean(loss, action_mask, dim=-1).mean()
    return 0.5 * loss


def _059_lr_lambda(current_step, *, num_warmup_steps, num_training_steps, num_cycles=0.5, min_lr_rate=0.0):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _hub_setup(folder: Path) -> dict:
    """The hub test's inputs: a tiny model and a MedQA-like dataset laid out in a Hugging Face cache under folder/hf,
    the environment that points there offline, and train.py's flags naming them by hub id."""
    make_demo_like_checkpoint(folder / "tiny")
    snapshot = _hub_cache(folder / "hf", "org/tiny", {f.name: f for f in (folder / "tiny").iterdir()})
    rows = [json.dumps({**MEDQA_ROW, "question": f"Which dose {i}?"}) for i in range(8)]
    questions = _hub_cache(folder / "hf", "org/medqa", {"data/train-00000.jsonl": "\n".join(rows),
                                                        "data/test-00000.jsonl": rows[0]}, "dataset")
    argv = ["--model", "org/tiny", "--train-data", "org/medqa", "--eval-data", "org/medqa", "--steps", "1",
            "--rollout-batch", "8", "--train-batch", "4", "--micro-batch", "4", "--max-new-tokens", "8",
            "--save-every", "0"]
    return {"snapshot": snapshot, "questions": questions, "argv": argv,
            "env": {**os.environ, "HF_HOME": str(folder / "hf"), "HF_HUB_OFFLINE": "1"}}


def _evaluate_argv(ckpt):
    return ["--model", str(ckpt), "--dose", "12", "--batch", "4", "--samples", "2", "--max-new-tokens", "12"]


def _hub_cache(home: Path, repo: str, files: dict, repo_type="model") -> Path:
    """Lay out files in a Hugging Face cache under `home` (HF_HOME) as a download would: a snapshot folder per
    commit, refs/main naming it. -> the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = home / "hub" / f"{repo_type}s--{repo.replace('/', '--')}"
    for name, src in files.items():              # each file a blob named by its hash, the snapshot a symlink to it
        content = src.read_bytes() if isinstance(src, Path) else src.encode()
        blob = root / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        dest = root / "snapshots" / commit / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of 32 KiB blocks, 7-byte record headers,
    holding protobuf Records), as {key: value} with JSON-decoded values. W&B's service process writes the file and
    may still be writing it when run.finish() returns (seen on a loaded 2-core machine): read it once it holds the
    run's last record, "exit"."""
    from wandb.proto import wandb_internal_pb2
    deadline = time.time() + 60
    while True:
        raw, pos, block, part, rows, kinds = run_file.read_bytes(), 7, 32768, b"", [], set()
        while pos + 7 <= len(raw):
            if block - pos % block < 7:                     # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            if pos + 7 + length > len(raw):                 # a record still being written: read again
                break
            part, pos = part + raw[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):                              # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(part)
                kinds.add(record.WhichOneof("record_type"))
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in record.history.item})
                part = b""
        if "exit" in kinds:
            return rows
        assert time.time() < deadline, f"{run_file}: no exit record 60 s after the run finished"
        time.sleep(0.2)


def _mistake(fn, match, out=None):
    """fn must fail with a one-line message matching `match`, and (when given) create nothing in `out`."""
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    if out is not None:
        assert not Path(out).exists(), f"{out} was written before the mistake was found"


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _unlocked(out):
    """True when no process holds <out>/.lock (a lock that nobody holds can be taken at once)."""
    import fcntl
    with open(Path(out) / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


if __name__ == "__main__":       # a background launch (_launch): python test_all.py JOBS.json
    common.init_distributed()    # under torchrun one process group for all the jobs: each script's own finish()
    _run_jobs(json.loads(Path(sys.argv[1]).read_text()))    # leaves it as it is; alone, a world of one, no group
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os._exit(0)                  # as common.cli: skip the interpreter teardown, where gloo now and then aborts
