"""opd_verl.demo.task (the CPU demo's synthetic GSM8K-format task) and opd_verl.demo.sft (its small SFT trainer).

The generator is deterministic for a seed, every worked answer is right and is scored 1.0 by opd_verl.rewards, the
splits never share an arithmetic fact, and the verl parquet is exactly what data_preprocess/gsm8k.py writes for
the same {question, answer} records (checked by running the script on them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from opd_verl.demo import task as dt
from opd_verl.rewards import GSM8K, INSTRUCTIONS, compute_score

REPO = Path(__file__).resolve().parents[1]
VERL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def test_generation_is_deterministic_for_a_seed():
    a = dt.generate_problems(300, seed=7)
    b = dt.generate_problems(300, seed=7)
    c = dt.generate_problems(300, seed=8)
    assert [p.question + p.answer for p in a] == [p.question + p.answer for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.key() for p in a}) == 300  # distinct stories


def test_problems_are_small_two_digit_arithmetic_in_gsm8k_style():
    problems = dt.generate_problems(2000, seed=0)
    ops = {p.op for p in problems}
    assert ops == {"+", "-"}
    for p in problems:
        assert 0 <= p.result <= 99
        assert 1 <= p.a <= 99 and 1 <= p.b <= 99
        assert re.fullmatch(r"[A-Z][a-z]+ has \d+ [a-z]+ and [a-z0-9 ]+\. How many [a-z]+ does (he|she) have now\?", p.question)
        assert str(p.a) in p.question and str(p.b) in p.question


def _check_equation(line: str) -> None:
    lhs, rhs = line.split(" = ")
    tokens = lhs.split()
    value = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        value = value + int(number) if op == "+" else value - int(number)
    assert value == int(rhs), line


def test_worked_answers_are_right_and_score_one():
    for p in dt.generate_problems(1500, seed=3):
        lines = p.answer.split("\n")
        assert len(lines) == 3 and lines[0].startswith("Ones: ") and lines[1].startswith("Tens: ")
        for line in lines[:2]:
            _check_equation(line.split(": ", 1)[-1])
        a1, a0 = divmod(p.a, 10)
        b1, b0 = divmod(p.b, 10)
        ones = int(lines[0].rsplit("= ", 1)[1])
        tens = int(lines[1].rsplit("= ", 1)[1])
        # the column steps compose to the result: tens digit and ones digit
        assert 10 * tens + ones % 10 == p.result
        assert lines[2] == f"#### {p.result}"
        assert compute_score(GSM8K, p.answer, str(p.result)) == 1.0
        assert compute_score(GSM8K, p.answer, str(p.result + 1)) == 0.0
        assert (a1, a0, b1, b0) == (p.a // 10, p.a % 10, p.b // 10, p.b % 10)


def test_splits_partition_problems_without_sharing_arithmetic_facts():
    problems = dt.generate_problems(1000, seed=1)
    splits = dt.split_problems(problems, {"train": 0.8, "val": 0.1, "test": 0.1})
    assert sum(len(v) for v in splits.values()) == 1000
    assert 760 <= len(splits["train"]) <= 840 and 70 <= len(splits["val"]) <= 130 and len(splits["test"]) >= 60
    facts = {name: {(p.op, p.a, p.b) for p in ps} for name, ps in splits.items()}
    assert not facts["train"] & facts["val"] and not facts["train"] & facts["test"] and not facts["val"] & facts["test"]


def test_rows_match_data_preprocess_gsm8k(tmp_path):
    """The demo's verl parquet equals what data_preprocess/gsm8k.py writes for the same GSM8K-schema records."""
    problems = dt.generate_problems(40, seed=5)
    splits = {"train": problems[:30], "test": problems[30:]}
    paths = dt.write_task(tmp_path / "demo", splits)
    for split, ps in splits.items():
        source = tmp_path / f"{split}.jsonl"
        source.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in ps))
    result = subprocess.run(
        [sys.executable, str(REPO / "data_preprocess" / "gsm8k.py"), "--local_dir", str(tmp_path / "script"),
         "--local_path", str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"), "--split", "train,test"],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr
    for split in splits:
        ours = pq.read_table(paths[split])
        theirs = pq.read_table(tmp_path / "script" / f"{split}.parquet")
        assert ours.column_names == VERL_COLUMNS
        assert ours.column_names == theirs.column_names
        assert ours.to_pylist() == theirs.to_pylist()
    row = pq.read_table(paths["train"]).to_pylist()[0]
    p = splits["train"][0]
    assert row["data_source"] == GSM8K
    assert row["prompt"] == [{"role": "user", "content": p.question + " " + INSTRUCTIONS["gsm8k"]}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": str(p.result)}


def test_sft_pairs_hold_prompt_and_full_answer(tmp_path):
    problems = dt.generate_problems(20, seed=2)
    paths = dt.write_task(tmp_path, {"train": problems})
    rows = pq.read_table(paths["sft_train"]).to_pylist()
    assert len(rows) == 20
    for row, p in zip(rows, problems):
        assert row["prompt"] == dt.prompt_text(p.question)
        assert row["response"] == p.answer
        assert row["messages"] == [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": p.answer}]


def test_build_task_writes_every_split(tmp_path):
    settings = dt.TaskSettings(n_problems=200, seed=4)
    paths = dt.build_task(tmp_path, settings)
    counts = {s: pq.read_metadata(paths[s]).num_rows for s in ("train", "val", "test")}
    assert sum(counts.values()) == 200 and min(counts.values()) > 0
    again = dt.build_task(tmp_path / "again", settings)
    assert pq.read_table(again["test"]).to_pylist() == pq.read_table(paths["test"]).to_pylist()


def test_settings_hash_is_stable_and_sensitive():
    a = dt.TaskSettings().as_dict()
    assert dt.settings_hash(a) == dt.settings_hash(dict(reversed(list(a.items()))))
    assert dt.settings_hash(a) != dt.settings_hash({**a, "seed": 1})


def test_tokenizer_words_round_trip_and_shorten_prompts():
    from opd_verl.demo.sft import chat_prompt_ids
    from opd_verl.demo.tiny_models import build_tokenizer

    tok = build_tokenizer(words=dt.tokenizer_words())
    plain = build_tokenizer()
    for p in dt.generate_problems(50, seed=9):
        ids = chat_prompt_ids(tok, dt.prompt_text(p.question))
        assert len(ids) < 40 < len(chat_prompt_ids(plain, dt.prompt_text(p.question)))
        text = tok.decode(ids)
        assert dt.prompt_text(p.question) in text
        answer_ids = tok(p.answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(answer_ids) == p.answer
        # digits stay one token each: the models compute digit by digit
        assert all(len(tok.decode([i])) == 1 for i in answer_ids if tok.decode([i]).isdigit())


# ----------------------------------------------------------------------------------------------------------------
# opd_verl.demo.sft
# ----------------------------------------------------------------------------------------------------------------


def test_collate_masks_prompt_and_padding():
    from opd_verl.demo.sft import collate

    batch = collate([([5, 6, 7, 8], 2), ([9, 10, 11], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]


def test_encode_examples_appends_eos_after_the_chat_prompt():
    from opd_verl.demo.sft import chat_prompt_ids, encode_examples
    from opd_verl.demo.tiny_models import build_tokenizer

    tok = build_tokenizer(words=dt.tokenizer_words())
    [(ids, n_prompt)] = encode_examples(tok, ["What is 1 + 1?"], ["#### 2"])
    assert ids[:n_prompt] == chat_prompt_ids(tok, "What is 1 + 1?")
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "#### 2"


def test_lr_schedule_warms_up_and_decays():
    from opd_verl.demo.sft import SFTConfig, lr_at

    cfg = SFTConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) < lr_at(50, cfg) < lr_at(10, cfg)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_train_sft_lowers_the_answer_loss_of_a_tiny_model():
    import torch

    from opd_verl.demo.sft import SFTConfig, answer_loss, collate, encode_examples, train_sft
    from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer

    torch.set_num_threads(1)
    tok = build_tokenizer(words=dt.tokenizer_words())
    model = build_qwen2(tok, hidden_size=64, num_layers=1, seed=0)
    problems = dt.generate_problems(32, seed=0)
    prompts = [dt.prompt_text(p.question) for p in problems]
    answers = [p.answer for p in problems]
    batch = collate(encode_examples(tok, prompts, answers), tok.pad_token_id)
    with torch.no_grad():
        before = float(answer_loss(model, batch))
    evals = []
    result = train_sft(model, tok, prompts, answers,
                       SFTConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=3, log_every=0, eval_every=10),
                       eval_fn=lambda step: evals.append(step) or 0.0, log=lambda m: None)
    with torch.no_grad():
        after = float(answer_loss(model, batch))
    assert result.steps == 30 and after < 0.6 * before
    assert evals == [10, 20, 30]
    assert not model.training
