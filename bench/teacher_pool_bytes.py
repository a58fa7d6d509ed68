"""Bytes the teacher pool (opd.teacher_pool) sends to the student's pool per response token, for each support,
against the [T, V] logits they replace. A pure computation (no run): each payload's byte count is the `nbytes` of a
tensor of the dtype and shape the pool sends (checked in tests/test_bench_teacher_pool_bytes.py).

    .venv/bin/python bench/teacher_pool_bytes.py [--out bench/results/teacher_pool_bytes.json]

Payloads per response token (written once by the pool into TransferQueue, read once by the student's workers).
verl's reference output is nested over each sample's prompt + response, and the pool's payload rides it, so the
prompt positions travel too (zeros): a factor (P + R) / R on what a response token needs.
- sampled: the teacher's log-prob of the sampled token, fp32: 4 B x (P + R) / R.
- topk (built): the teachers' top-k ids (int32) and log-probs (fp32) at the loss temperature, and for the
  alignment check the sampled token's log-prob and its resolution (fp32 each): (8k + 8) B x (P + R) / R. The tail
  mass is not sent: 1 - sum exp(top-k log-probs), computed where the divergence needs it.
- hidden (support=full, built): the teacher's final hidden state in its compute dtype (bf16 on GPU), and for the
  alignment check the sampled token's log-prob and its resolution (fp32 each): (2H + 8) B x (P + R) / R per
  teacher (several teachers: each one's hidden state; the label and resolution once).
- logits (what none of them sends): the [T, V] row, bf16 2V B (fp32 4V B).
Per step = per response token x the step's response tokens (train_batch_size x rollout.n x mean response length).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

#: teacher shapes (hidden size, vocabulary) from their config.json
TEACHERS = {"Qwen3-8B": (4096, 151936), "Qwen3-32B": (5120, 151936), "Qwen2.5-72B": (8192, 152064)}
STEP = {"train_batch_size": 512, "rollout_n": 8, "prompt_tokens": 512, "response_tokens": 2048}
TOPK = 20


def payload_bytes(support: str, hidden: int, vocab: int, topk: int = TOPK, prompt: int = 0, response: int = 1) -> float:
    """Bytes per response token of one support's payload (the nbytes of the tensors the pool sends)."""
    positions = prompt + response
    if support == "sampled":
        return torch.empty(positions, dtype=torch.float32).nbytes / response
    if support == "topk":
        ids = torch.empty(positions, topk, dtype=torch.int32).nbytes
        logp = torch.empty(positions, topk, dtype=torch.float32).nbytes
        label_and_resolution = 2 * torch.empty(positions, dtype=torch.float32).nbytes
        return (ids + logp + label_and_resolution) / response
    if support == "hidden":
        states = torch.empty(positions, hidden, dtype=torch.bfloat16).nbytes
        label_and_resolution = 2 * torch.empty(positions, dtype=torch.float32).nbytes
        return (states + label_and_resolution) / response
    if support == "logits_bf16":
        return torch.empty(vocab, dtype=torch.bfloat16).nbytes
    if support == "logits_fp32":
        return torch.empty(vocab, dtype=torch.float32).nbytes
    raise ValueError(support)


SUPPORTS = ("sampled", "topk", "hidden", "logits_bf16", "logits_fp32")


def table(step: dict = STEP, topk: int = TOPK) -> dict:
    tokens = step["train_batch_size"] * step["rollout_n"] * step["response_tokens"]
    out = {}
    for name, (hidden, vocab) in TEACHERS.items():
        logits = payload_bytes("logits_bf16", hidden, vocab)
        rows = {}
        for support in SUPPORTS:
            per_token = payload_bytes(support, hidden, vocab, topk, step["prompt_tokens"], step["response_tokens"])
            rows[support] = {"bytes_per_response_token": per_token, "gib_per_step": per_token * tokens / 1024**3,
                             "fraction_of_bf16_logits": per_token / logits}
        out[name] = {"hidden": hidden, "vocab": vocab, "supports": rows}
    return {"response_tokens_per_step": tokens, "step": step, "topk": topk, "teachers": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher_pool_bytes.json"))
    args = parser.parse_args(argv)
    result = {"command": " ".join([".venv/bin/python", "bench/teacher_pool_bytes.py", *(argv or sys.argv[1:])]),
              "kind": "computation (no run)", **table()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["teachers"].items():
        cells = ", ".join(f"{s} {v['bytes_per_response_token']:.0f} B ({v['gib_per_step']:.2f} GiB/step)"
                          for s, v in row["supports"].items())
        print(f"{name}: {cells}")


if __name__ == "__main__":
    main()
