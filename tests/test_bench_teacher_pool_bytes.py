"""bench/teacher_pool_bytes.py: the payloads' byte counts per response token, against hand arithmetic."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import teacher_pool_bytes as tpb  # noqa: E402


@pytest.mark.parametrize("support, expected", [
    ("sampled", 4 * (512 + 2048) / 2048),  # fp32 over prompt + response, per response token
    ("topk", (20 * 4 + 20 * 4 + 4 + 4) * (512 + 2048) / 2048),  # int32 ids, fp32 log-probs, label, resolution
    ("hidden", (5120 * 2 + 4 + 4) * (512 + 2048) / 2048),  # bf16 hidden state, label, resolution
    ("logits_bf16", 151936 * 2),
    ("logits_fp32", 151936 * 4),
])
def test_payload_bytes(support, expected):
    assert tpb.payload_bytes(support, 5120, 151936, 20, prompt=512, response=2048) == expected


def test_the_written_table(tmp_path):
    out = tmp_path / "bytes.json"
    tpb.main(["--out", str(out)])
    result = json.loads(out.read_text())
    tokens = 512 * 8 * 2048
    assert result["response_tokens_per_step"] == tokens
    row = result["teachers"]["Qwen3-32B"]["supports"]
    assert row["hidden"]["gib_per_step"] == pytest.approx(10248 * 1.25 * tokens / 1024**3)
    assert row["topk"]["fraction_of_bf16_logits"] == pytest.approx(168 * 1.25 / 303872)
