"""The CPU demo's synthetic task: arithmetic word problems in GSM8K's format (pure functions).

    problems = generate_problems(n=2000, seed=0)           # deterministic for a seed, no duplicates
    splits = split_problems(problems, {"train": 0.8, "val": 0.1, "test": 0.1})
    write_task(out_dir, splits)                            # verl parquet per split + SFT pairs

A problem reads like GSM8K ("Tom has 23 apples and buys 45 more. How many apples does he have now?"); its
solution is a short worked answer ending in GSM8K's answer line ("23 + 45 = 68\\n#### 68"). The verl rows are
exactly what data_preprocess/gsm8k.py writes for a GSM8K record {question, answer}: data_source "openai/gsm8k"
(so opd_verl.rewards scores them), the user prompt = question + the "####" instruction, reward_model.ground_truth
= the number after "####", extra_info = {split, index, question, answer}.

Numbers are small (1-2 digits; sums below 100, differences non-negative) so that tiny models can learn the task.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from opd_verl.parquet import write_parquet
from opd_verl.rewards import GSM8K, INSTRUCTIONS

# --------------------------------------------------------------------------------------------------------------
# Vocabulary of the stories
# --------------------------------------------------------------------------------------------------------------

NAMES_HE = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Omar", "Raj", "Ivan", "Carlos")
NAMES_SHE = ("Anna", "Mia", "Lily", "Emma", "Sara", "Nina", "Zoe", "Aisha", "Rosa", "Mei")
OBJECTS = (
    "apples", "books", "pens", "stamps", "marbles", "cookies", "stickers", "coins", "shells", "cards",
    "oranges", "pencils", "toys", "eggs", "flowers", "candies",
)
# (verb phrase template, op); {n} is the second number.
ADD_VERBS = ("buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more", "picks up {n} more")
SUB_VERBS = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}", "gives {n} to a friend")

#: Instruction appended to each question (the same one data_preprocess/gsm8k.py appends).
INSTRUCTION = INSTRUCTIONS["gsm8k"]



def tokenizer_words() -> tuple[str, ...]:
    """Multi-character tokens for opd_verl.demo.tiny_models.build_tokenizer(words=...): the story's words and phrases,
    the instruction and the chat roles, each one token (as a BPE vocabulary would hold common words).

    Digits, operators and the answer stay one character per token, so the models still compute digit by digit;
    the prompt shrinks from ~155 character tokens to ~25 tokens, which makes CPU training ~5x cheaper.
    Every word starts with a character no other word ends with in a way that could merge differently, and all are
    matched whole (added tokens), so tokenization is the same in transformers, verl and vLLM.
    """
    words: list[str] = ["####", "user", "assistant", " " + INSTRUCTION, ". How many", " and", " has", " more"]
    words += [" + ", " - ", " = ", "\n#### ", "Ones: ", "\nTens: "]
    words += list(NAMES_HE) + list(NAMES_SHE)
    words += [" " + obj for obj in OBJECTS]
    words += [" does he have now?", " does she have now?"]
    for verb in ADD_VERBS + SUB_VERBS:
        for part in verb.split("{n}"):
            part = part.strip()
            if part and part != "more":
                words.append(" " + part)
    out: list[str] = []
    for word in words:
        if word not in out:
            out.append(word)
    return tuple(out)


@dataclass(frozen=True)
class Problem:
    """One word problem: `a op b = result` told as a story."""

    name: str
    pronoun: str
    obj: str
    verb: str
    op: str  # "+" or "-"
    a: int
    b: int

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return (
            f"{self.name} has {self.a} {self.obj} and {self.verb.format(n=self.b)}. "
            f"How many {self.obj} does {self.pronoun} have now?"
        )

    @property
    def answer(self) -> str:
        """The worked solution in GSM8K's format: column arithmetic, one line per digit, last line "#### <number>".

            Ones: 9 + 7 = 16            Ones: 12 - 7 = 5
            Tens: 4 + 2 + 1 = 7         Tens: 5 - 2 - 1 = 2
            #### 76                     #### 25

        Every step is a one-digit sum or difference plus the carry (borrow), so each answer token depends on a few
        earlier tokens only: small models learn it quickly and generalise to unseen operands. The final answer is
        read off the two lines; there is deliberately no restated "49 + 27 = 76" line: with one, a student may learn
        to recompute the sum there while the teacher copies its lines, and on the student's own (erroneous) samples
        OPD then penalises the student for recovering from its mistakes (measured: the student got worse).
        """
        a1, a0 = divmod(self.a, 10)
        b1, b0 = divmod(self.b, 10)
        if self.op == "+":
            ones = a0 + b0
            carry = ones // 10
            lines = [f"Ones: {a0} + {b0} = {ones}", f"Tens: {a1} + {b1} + {carry} = {a1 + b1 + carry}"]
        else:
            borrow = 1 if a0 < b0 else 0
            top = a0 + 10 * borrow
            lines = [f"Ones: {top} - {b0} = {top - b0}", f"Tens: {a1} - {b1} - {borrow} = {a1 - b1 - borrow}"]
        lines.append(f"#### {self.result}")
        return "\n".join(lines)

    def key(self) -> tuple:
        return (self.name, self.obj, self.verb, self.op, self.a, self.b)


@dataclass(frozen=True)
class TaskSettings:
    """What the generated data depends on (part of the demo's cache key)."""

    n_problems: int = 3000
    seed: int = 0
    max_operand: int = 49  # addition: 1..max_operand each (sum < 100)
    max_minuend: int = 99  # subtraction: a in 10..max_minuend, b in 1..a
    sub_fraction: float = 0.5
    split: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.1), ("test", 0.1))

    def as_dict(self) -> dict:
        return asdict(self)


def sample_problem(rng: random.Random, settings: TaskSettings = TaskSettings()) -> Problem:
    """One random problem drawn from `rng`."""
    if rng.random() < settings.sub_fraction:
        op = "-"
        a = rng.randint(10, settings.max_minuend)
        b = rng.randint(1, a)
        verb = rng.choice(SUB_VERBS)
    else:
        op = "+"
        a = rng.randint(1, settings.max_operand)
        b = rng.randint(1, settings.max_operand)
        verb = rng.choice(ADD_VERBS)
    if rng.random() < 0.5:
        name, pronoun = rng.choice(NAMES_HE), "he"
    else:
        name, pronoun = rng.choice(NAMES_SHE), "she"
    return Problem(name=name, pronoun=pronoun, obj=rng.choice(OBJECTS), verb=verb, op=op, a=a, b=b)


def generate_problems(n: int, seed: int = 0, settings: TaskSettings | None = None) -> list[Problem]:
    """`n` distinct problems (distinct stories), deterministic for `seed` (and the settings' ranges)."""
    settings = settings or TaskSettings(n_problems=n, seed=seed)
    rng = random.Random(seed)
    seen: set[tuple] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from these ranges; lower n_problems")
        problem = sample_problem(rng, settings)
        if problem.key() in seen:
            continue
        seen.add(problem.key())
        out.append(problem)
    return out


def split_problems(problems: Sequence[Problem], fractions: Mapping[str, float] | Sequence[tuple[str, float]]) -> dict[str, list[Problem]]:
    """Consecutive slices of `problems` (already shuffled by the generator) in the given proportions.

    Arithmetic facts (op, a, b) are kept within one split, so val/test questions are not train questions with
    another name or object: the models must compute, not recall.
    """
    items = list(fractions.items()) if isinstance(fractions, Mapping) else list(fractions)
    total = sum(f for _, f in items)
    if total <= 0:
        raise ValueError("split fractions must sum to a positive number")
    # group by arithmetic fact, in first-seen order
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.op, p.a, p.b), []).append(p)
    facts = list(groups.values())
    out: dict[str, list[Problem]] = {name: [] for name, _ in items}
    n = len(problems)
    targets = [(name, f / total * n) for name, f in items]
    i = 0
    for k, (name, target) in enumerate(targets):
        last = k == len(targets) - 1
        while i < len(facts) and (last or len(out[name]) + len(facts[i]) / 2 <= target):
            out[name].extend(facts[i])
            i += 1
    return out


# --------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------


def prompt_text(question: str) -> str:
    """The user message: the question plus the "####" instruction (as data_preprocess/common.with_instruction)."""
    return question if "####" in question else question + " " + INSTRUCTION


def verl_row(problem: Problem, index: int, split: str) -> dict:
    """The verl RL row data_preprocess/gsm8k.py writes for the GSM8K record {question, answer}."""
    return {
        "data_source": GSM8K,
        "prompt": [{"role": "user", "content": prompt_text(problem.question)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(problem.result)},
        "extra_info": {"split": split, "index": index, "question": problem.question, "answer": problem.answer},
    }


def sft_row(problem: Problem, index: int, split: str) -> dict:
    """An SFT pair: the same prompt messages as the RL row and the full worked answer.

    `messages` (user + assistant) is verl's multi-turn SFT format; `prompt`/`response` the single-turn one.
    """
    prompt = prompt_text(problem.question)
    return {
        "data_source": GSM8K,
        "prompt": prompt,
        "response": problem.answer,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": problem.answer}],
        "extra_info": {"split": split, "index": index, "question": problem.question, "answer": problem.answer},
    }


def write_task(out_dir: str | os.PathLike, splits: Mapping[str, Sequence[Problem]]) -> dict[str, str]:
    """Write OUT/<split>.parquet (verl RL rows) and OUT/sft_<split>.parquet (SFT pairs) for every split.

    Returns {"train": path, "val": path, ..., "sft_train": path, ...}.
    """
    out_dir = Path(out_dir)
    paths: dict[str, str] = {}
    for split, problems in splits.items():
        paths[split] = write_parquet([verl_row(p, i, split) for i, p in enumerate(problems)], out_dir / f"{split}.parquet")
        paths[f"sft_{split}"] = write_parquet(
            [sft_row(p, i, split) for i, p in enumerate(problems)], out_dir / f"sft_{split}.parquet"
        )
    return paths


def build_task(out_dir: str | os.PathLike, settings: TaskSettings = TaskSettings()) -> dict[str, str]:
    """Generate, split and write the task described by `settings`; returns the paths (see `write_task`)."""
    problems = generate_problems(settings.n_problems, settings.seed, settings)
    return write_task(out_dir, split_problems(problems, settings.split))


def settings_hash(settings: Mapping) -> str:
    """A short stable hash of a JSON-able settings mapping (cache keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
