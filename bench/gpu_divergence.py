"""The loss-level divergences at real scale on one GPU: time and peak CUDA memory, one script, one go.

    python bench/gpu_divergence.py                      # on a CUDA machine: T in {8192, 16384}, V = 151936, bf16
    python bench/gpu_divergence.py --device cpu --tiny  # a smoke run anywhere (what tests/ runs)
    python bench/gpu_divergence.py --ts 8192 --hidden 5120 --out bench/results/gpu_divergence_h5120.json
                                                        # the teacher pool's support=full at a Qwen3-32B width

Needs only torch and this repository (opd_verl.algorithms is pure torch; no verl, no vLLM); Liger-Kernel's
chunked JSD runs beside ours when ``liger_kernel`` imports. Writes ``bench/results/gpu_divergence.json`` (``--out``)
with the command, the device and, per T and variant, the median of ``--reps`` timed forward + backward passes
(CUDA events, after one warm-up pass) and the peak of ``torch.cuda.max_memory_allocated`` above the inputs.

Variants (loss = mean of the per-token values, forward + backward):
* on logits ``[T, V]`` in bf16 (the trainer's path): ``sampled`` (log_softmax in float32 + gather, k1),
  ``full_jsd`` / ``full_reverse_kl`` (`chunked_full_divergence`), ``topk_jsd`` (`chunked_teacher_topk`, k = 20, +
  `chunked_topk_divergence`);
* from hidden states ``[T, H]`` in bf16 with lm-head weights ``[V, H]``: ``hidden_jsd``
  (`chunked_divergence_from_hidden`) and, if installed, ``liger_jsd`` (torch.compile'd, as Liger runs by default).
Also: the bf16 batch invariance of the student's log-probs (the same rows alone vs inside a larger batch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

FULL = {"ts": [8192, 16384], "vocab": 151936, "hidden": 4096, "chunk": 1024, "topk": 20, "reps": 5}
TINY = {"ts": [64], "vocab": 512, "hidden": 32, "chunk": 16, "topk": 4, "reps": 1}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak_mb(device, base: int):
    import torch

    if device.type != "cuda":
        return None  # CPU peaks: bench/full_vocab_divergence.py measures them
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _variant_fn(name: str, x: dict, cfg: dict):
    import torch

    from opd_verl.algorithms.divergences import (
        chunked_divergence_from_hidden,
        chunked_full_divergence,
        chunked_teacher_topk,
        chunked_topk_divergence,
        sampled_reverse_kl,
    )

    chunk = cfg["chunk"]

    def run():
        if name in ("hidden_jsd", "liger_jsd"):
            hs = x["hs"].detach().requires_grad_(True)
            ws = x["ws"].detach().requires_grad_(True)
            if name == "hidden_jsd":
                loss = chunked_divergence_from_hidden(hs, ws, x["ht"], x["wt"], "jsd", 0.5, chunk_size=chunk).mean()
            else:
                from bench_common import liger_jsd_loss

                loss = liger_jsd_loss(0.5, chunk)(hs, ws, x["ht"], x["wt"], x["ids"])
            loss.backward()
            return
        zs = x["zs"].detach().requires_grad_(True)
        if name == "sampled":
            s = torch.log_softmax(zs.float(), -1).gather(-1, x["ids"][:, None]).squeeze(-1)
            loss = sampled_reverse_kl(s, x["q"], "k1").mean()
        elif name.startswith("full_"):
            loss = chunked_full_divergence(zs, x["zt"], name[len("full_"):], 0.5, chunk_size=chunk).mean()
        elif name == "topk_jsd":
            ids, lt = chunked_teacher_topk(x["zt"], cfg["topk"], 1.0, chunk)
            loss = chunked_topk_divergence(zs, ids, lt, "jsd", 0.5, chunk_size=chunk).mean()
        else:
            raise ValueError(name)
        loss.backward()

    return run


def _inputs(t: int, cfg: dict, device, dtype) -> dict:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    v, h = cfg["vocab"], cfg["hidden"]
    zs = torch.randn(t, v, generator=g, device=device).mul_(3.0)
    zt = (zs * 0.8).add_(torch.randn(t, v, generator=g, device=device), alpha=1.5)
    hs = torch.randn(t, h, generator=g, device=device)
    ws = torch.randn(v, h, generator=g, device=device).mul_(3.0 / h**0.5)
    return {
        "zs": zs.to(dtype), "zt": zt.to(dtype), "hs": hs.to(dtype), "ws": ws.to(dtype),
        "ht": (hs + 0.5 * torch.randn(t, h, generator=g, device=device)).to(dtype),
        "wt": (ws + 0.5 * 3.0 / h**0.5 * torch.randn(v, h, generator=g, device=device)).to(dtype),
        "ids": torch.randint(v, (t,), generator=g, device=device),
        "q": -10.0 * torch.rand(t, generator=g, device=device),
    }


def _time(fn, device, reps: int) -> tuple[list[float], float | None]:
    import torch

    fn()  # warm-up (and torch.compile for Liger)
    base = _peak_reset(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times, _peak_mb(device, base)


def batch_invariance(cfg: dict, device, dtype) -> dict:
    """max |log p(rows alone) − log p(rows in a 4× larger batch)| of a bf16 lm-head + log-softmax."""
    import torch

    g = torch.Generator(device=device).manual_seed(1)
    v, h, n = cfg["vocab"], cfg["hidden"], 64
    w = torch.randn(v, h, generator=g, device=device).mul_(1.0 / h**0.5).to(dtype)
    hs = torch.randn(4 * n, h, generator=g, device=device).to(dtype)
    ids = torch.randint(v, (4 * n,), generator=g, device=device)

    def logp(rows):
        z = torch.nn.functional.linear(hs[:rows], w).float()
        return torch.log_softmax(z, -1).gather(-1, ids[:rows, None]).squeeze(-1)

    alone, inside = logp(n), logp(4 * n)[:n]
    return {"rows": n, "batch": 4 * n, "max_abs_diff": (alone - inside).abs().max().item(),
            "bitwise_equal": bool(torch.equal(alone, inside))}


def run(cfg: dict, device_name: str, argv: list[str]) -> dict:
    import torch

    from bench_common import machine_info

    device = torch.device(device_name)
    dtype = torch.bfloat16
    from bench_common import liger_available

    liger = liger_available()
    variants = ["sampled", "full_jsd", "full_reverse_kl", "topk_jsd", "hidden_jsd"] + (["liger_jsd"] if liger else [])
    result = {
        "benchmark": "gpu_divergence",
        "command": " ".join(["python", "bench/gpu_divergence.py", *argv]),
        "machine": machine_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device_name,
        "torch": torch.__version__,
        "settings": {**cfg, "dtype": "bfloat16", "liger_kernel": liger or "not installed"},
        "results": [],
    }
    for t in cfg["ts"]:
        x = _inputs(t, cfg, device, dtype)
        row = {"T": t}
        for name in variants:
            try:
                times, peak = _time(_variant_fn(name, x, cfg), device, cfg["reps"])
                row[name] = {"median_s": median(times), "times_s": times, "peak_mb": peak}
            except torch.OutOfMemoryError as e:
                row[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            print(f"T={t:<6d} {name:<16s} {row[name]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = row["sampled"].get("median_s")
        row["ratio_to_sampled"] = {n: row[n]["median_s"] / base for n in variants
                                   if n != "sampled" and base and "median_s" in row[n]}
        result["results"].append(row)
        del x
    result["batch_invariance_bf16"] = batch_invariance(cfg, device, dtype)
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke run, any device)")
    p.add_argument("--ts", type=int, nargs="+", default=None, help="token counts (default 8192 16384)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size of the hidden-state variants (default 4096; 5120: a Qwen3-32B teacher's, the "
                        "teacher pool's support=full)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_divergence.json")
    args = p.parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    if args.ts:
        cfg["ts"] = args.ts
    if args.hidden:
        cfg["hidden"] = args.hidden
    result = run(cfg, args.device, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
