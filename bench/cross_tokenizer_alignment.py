"""Benchmark: the cost of a teacher with another tokenizer per step, at 1,024 samples x 1,024 response tokens (CPU).

    .venv/bin/python bench/cross_tokenizer_alignment.py            # 1024 x 1024 (about half a minute on 2 cores)
    .venv/bin/python bench/cross_tokenizer_alignment.py --quick    # 64 x 256

Writes ``bench/results/cross_tokenizer_alignment.json`` (``..._quick.json`` with ``--quick``) and prints it.

Two byte-level BPE tokenizers with different vocabularies (student 4000, teacher 1000) and a SentencePiece-style
unigram teacher (byte fallback) are trained here on a synthetic text (English-like words, numbers, accented and CJK
characters, emoji); each response is the student's encoding of a stretch of that text cut to the response length,
ending with the student's eos (mapped to the teacher's). Timed, each once per teacher (opd_verl.algorithms.
token_alignment): the student's per-token bytes (with and without the check against its decode), the
re-tokenization with the teacher (`teacher_response_ids`: decode + one batched encode), the teacher's per-token
bytes, and the alignment with the span terms (`span_terms`: spans, segment sums, per-token terms, statistics).
The per-tokenizer id -> bytes tables are built once (timed apart). Everything runs on the CPU in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from tiny_tokenizers import byte_level_bpe, sentencepiece_unigram  # noqa: E402

from opd_verl.algorithms.token_alignment import (  # noqa: E402
    batch_token_bytes,
    span_terms,
    teacher_response_ids,
    token_table,
)

WORDS = ("the of and to in is was for on that with as by at from this his her they have had not are but which be "
         "one all were we when there can an your more if has will who would their what about out up them into "
         "answer question total each half twice number sum step therefore").split()
EXTRA = ["héllo", "café", "naïve", "crème", "日本語", "東京", "テキスト", "🙂", "🚀", "€", "£", "ж", "Ω"]


def synthetic_text(rng: random.Random, n_words: int) -> str:
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.12:
            out.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        elif r < 0.17:
            out.append(rng.choice(EXTRA))
        elif r < 0.2:
            out.append(rng.choice(["=", "+", "*", "####", "\n", ".", ",", "?"]))
        else:
            out.append(rng.choice(WORDS))
    return " ".join(out)


def responses(student, n: int, length: int, rng: random.Random) -> list[list[int]]:
    """n responses of `length` student tokens (the last one eos), each valid UTF-8 (a cut inside a character is
    moved back)."""
    out = []
    table = token_table(student)
    while len(out) < n:
        ids = student.encode(synthetic_text(rng, length), add_special_tokens=False)[: length - 1]
        while ids:
            try:
                b"".join(table.pieces[i] for i in ids).decode("utf-8")
                break
            except UnicodeDecodeError:
                ids = ids[:-1]
        if len(ids) == length - 1:
            out.append(ids + [student.eos_token_id])
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 256 (a smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    n, length = (64, 256) if args.quick else (1024, 1024)
    rng = random.Random(0)
    torch.manual_seed(0)
    corpus = [synthetic_text(rng, 200) for _ in range(200)]

    tokenizers = {}
    for name, build in (("student_bpe4000", lambda: byte_level_bpe(4000, corpus=corpus, name="student-bpe4000")),
                        ("teacher_bpe1000", lambda: byte_level_bpe(1000, corpus=corpus[::-3], name="teacher-bpe1000")),
                        ("teacher_sp2000", lambda: sentencepiece_unigram(2000, corpus=corpus, name="teacher-sp2000"))):
        tok, train_s = timed(build)
        _, table_s = timed(token_table, tok)
        tokenizers[name] = (tok, {"vocab": len(tok), "train_s": round(train_s, 3), "table_build_s": round(table_s, 3)})
    student = tokenizers["student_bpe4000"][0]
    student_ids, gen_s = timed(responses, student, n, length, rng)
    s = -3 * torch.rand(n * length)

    result = {
        "command": "python bench/cross_tokenizer_alignment.py" + (" --quick" if args.quick else ""),
        "samples": n, "response_tokens": length, "student_tokens": n * length,
        "tokenizers": {k: v[1] for k, v in tokenizers.items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, python {platform.python_version()}"
                   " (2 cores, shared with other jobs while measured)",
        "teachers": {},
    }
    tb_s, student_bytes_s = timed(batch_token_bytes, student, student_ids)
    _, student_bytes_unchecked_s = timed(batch_token_bytes, student, student_ids, verify=False)
    for name in ("teacher_bpe1000", "teacher_sp2000"):
        teacher = tokenizers[name][0]
        eos = {student.eos_token_id: teacher.eos_token_id}
        teacher_ids, retok_s = timed(teacher_response_ids, tb_s, teacher, eos)
        tb_t, teacher_bytes_s = timed(batch_token_bytes, teacher, teacher_ids)
        q = -3 * torch.rand(sum(map(len, teacher_ids)))
        out, align_s = timed(span_terms, tb_s, tb_t, s, q, special_map=eos)
        total = student_bytes_s + retok_s + teacher_bytes_s + align_s
        result["teachers"][name] = {
            "teacher_tokens": int(q.numel()),
            "seconds": {
                "student_bytes": round(student_bytes_s, 3),
                "student_bytes_unchecked": round(student_bytes_unchecked_s, 3),
                "retokenize": round(retok_s, 3),
                "teacher_bytes": round(teacher_bytes_s, 3),
                "align_and_span_terms": round(align_s, 3),
                "total_per_step": round(total, 3),
            },
            "stats": {k: round(v, 4) for k, v in out.stats.metrics().items()},
            "num_spans": out.stats.num_spans,
        }
    result["responses_build_s"] = round(gen_s, 3)
    path = args.out or REPO / "bench" / "results" / ("cross_tokenizer_alignment" + ("_quick" if args.quick else "")
                                                     + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
