"""Benchmark: the attention of a CPU run on packed rows (verl's use_remove_padding layout).

    .venv/bin/python bench/cpu_attention.py            # the shapes below, 3 repeats each
    .venv/bin/python bench/cpu_attention.py --quick    # one tiny shape, 1 repeat

Writes ``bench/results/cpu_attention.json`` (``..._quick.json`` with ``--quick``) and prints a table.

What is timed: forward + backward of a tiny random Qwen2 (2 layers; the demo student's width 64 and the e2e tests'
128) over one micro-batch of `n` sequences of `length` tokens, as verl's FSDP engine feeds it with remove-padding
(input_ids [1, n * length], position_ids restarting at each sequence, no attention mask), with
* ``sdpa``: transformers' sdpa, which builds a block-diagonal causal mask over all n * length tokens;
* ``opd_cpu_varlen``: opd_verl's pure-torch variable-length kernel (per-sequence sdpa over cu_seqlens), the CPU
  default in place of flash attention;
and, for reference, sdpa on the same sequences padded to [n, length] (no packing). The minimum over repeats, in ms;
also the largest |Δ log-prob| between the two packed kernels (they compute the same thing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

FULL = {"shapes": [[64, 32, 224], [128, 16, 96], [128, 64, 96]], "repeats": 3, "threads": 2}
QUICK = {"shapes": [[64, 4, 16]], "repeats": 1, "threads": 1}


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def measure_shape(hidden: int, n: int, length: int, repeats: int) -> dict:
    import verl  # noqa: F401  (the opd_verl plugin registers opd_cpu_varlen in transformers)

    from opd_verl.checks.verl_config import CPU_VARLEN_ATTENTION
    from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_qwen2(tokenizer, hidden_size=hidden, num_layers=2, head_dim=32)
    ids = torch.randint(0, len(tokenizer), (1, n * length))
    positions = torch.arange(length).repeat(n).view(1, -1)

    def step(attention: str, packed: bool = True):
        model.config._attn_implementation = attention
        model.zero_grad(set_to_none=True)
        inputs = {"input_ids": ids, "position_ids": positions} if packed else {"input_ids": ids.view(n, length)}
        logits = model(**inputs, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach()

    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        a = torch.log_softmax(model(input_ids=ids, position_ids=positions, use_cache=False).logits.double(), -1)
        model.config._attn_implementation = CPU_VARLEN_ATTENTION
        b = torch.log_softmax(model(input_ids=ids, position_ids=positions, use_cache=False).logits.double(), -1)
    result = {
        "hidden": hidden, "sequences": n, "length": length, "tokens": n * length,
        "sdpa_packed_ms": _time(lambda: step("sdpa"), repeats),
        f"{CPU_VARLEN_ATTENTION}_packed_ms": _time(lambda: step(CPU_VARLEN_ATTENTION), repeats),
        "sdpa_padded_ms": _time(lambda: step("sdpa", packed=False), repeats),
        "max_abs_logprob_diff": float((a - b).abs().max()),
    }
    result["sdpa_over_varlen"] = result["sdpa_packed_ms"] / result[f"{CPU_VARLEN_ATTENTION}_packed_ms"]
    return result


def run_benchmark(cfg: dict, log=print) -> dict:
    torch.set_num_threads(cfg["threads"])
    info = common.machine_info()
    rows = []
    for hidden, n, length in cfg["shapes"]:
        row = measure_shape(hidden, n, length, cfg["repeats"])
        log(f"hidden {hidden}, {n} x {length} tokens: sdpa packed {row['sdpa_packed_ms']:.0f} ms, "
            f"opd_cpu_varlen packed {row['opd_cpu_varlen_packed_ms']:.0f} ms ({row['sdpa_over_varlen']:.1f}x), "
            f"sdpa padded {row['sdpa_padded_ms']:.0f} ms; max |dlogp| {row['max_abs_logprob_diff']:.1e}")
        rows.append(row)
    return {
        "benchmark": "cpu_attention",
        "command": " ".join(["python", "bench/cpu_attention.py", *cfg.get("argv", [])]),
        "machine": info,
        "settings": {k: v for k, v in cfg.items() if k != "argv"},
        "results": rows,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cfg = {**(QUICK if args.quick else FULL), "argv": ["--quick"] if args.quick else []}
    out = args.out or common.RESULTS / f"cpu_attention{'_quick' if args.quick else ''}.json"
    print(f"wrote {common.write_result(run_benchmark(cfg), out)}")


if __name__ == "__main__":
    main()
