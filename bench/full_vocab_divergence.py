"""Benchmark: full-vocabulary JSD (chunked, custom autograd) vs the sampled-token reverse KL and Liger-Kernel, on CPU.

    .venv/bin/python bench/full_vocab_divergence.py            # full run (V = 151936, T in {1024, ..., 8192})
    .venv/bin/python bench/full_vocab_divergence.py --quick    # smoke test (a few minutes)

Liger-Kernel's variants run when ``liger_kernel`` imports (``pip install --no-deps liger-kernel==0.8.5``: its chunked
losses are pure torch); otherwise they are skipped and the JSON says so.

Writes ``bench/results/full_vocab_divergence.json`` (``..._quick.json`` with ``--quick``) and a PNG plot of
peak memory vs T next to it (``..._memory.png``).

What is measured (forward + backward of the mean of the per-token values, JSD with beta = 0.5):

* from hidden states (float32), ``[T, H]`` and lm-head weights ``[V, H]``, gradients to the student's hidden
  states and head weight:
  ``ours_hidden``    `chunked_divergence_from_hidden`;
  ``sampled_hidden`` the sampled-token baseline on the same student inputs: log pi_s(x_t) from the hidden states,
                     chunked with the same chunk size (`_ChunkedSampledLogp` below: per chunk logits = h W^T,
                     logsumexp, gather; backward recomputes the chunk's logits and uses the analytic gradient
                     onehot - softmax), then `sampled_reverse_kl` (k1) against given teacher log-probs. It saves
                     the per-token logsumexp ([T] floats) so its backward skips one reduction, i.e. it is a
                     slightly *favourable* baseline. Both sides pay the student lm-head matmul.
  ``liger_hidden`` / ``liger_compiled_hidden``  Liger-Kernel's ``LigerFusedLinearJSDLoss`` (pure JSD, mean over
                     tokens, same chunk size), eager and with torch.compile (warmed up, i.e. compiled, on one chunk
                     before the timed run);
  ``naive_hidden``   logits materialised with autograd (``F.linear``), then `full_divergence` (plain autograd):
                     O(T*V) memory; skipped when the extrapolated peak does not fit the memory budget.
* on pre-materialised logits ``[T, V]`` (the trainer's path), float32 and bfloat16 (inputs and gradient in that
  dtype): ``ours_logits`` `chunked_full_divergence`; ``topk_logits`` `chunked_teacher_topk` (k = 20) +
  `chunked_topk_divergence`; ``sampled_logits`` ``log_softmax(z.float()).gather(ids)`` + `sampled_reverse_kl`
  (plain autograd). float32 at T = 8192 runs without the sampled baseline (memory only).

Memory: every measurement runs in a fresh subprocess (``--quick`` / ``isolate=False``: one reused worker
process). After the inputs are allocated and a small warm-up call has run, the kernel's peak-RSS mark is
reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the peak is ``VmHWM - VmRSS`` read from
``/proc/self/status`` after the run: the resident memory the forward + backward added on top of its inputs,
including the gradients it returns. tracemalloc does not see torch's allocations, and torch has no CPU
allocator statistics. torch's default CPU allocator is plain malloc, and glibc always serves blocks >= 32 MB
(the [chunk, V] logits chunks and [T, V] gradients of the full run: 1024 x 151936 x 4 B = 594 MB) with mmap and
unmaps them on free, so RSS tracks the live tensors; smaller freed blocks (the ~2 MB CPU passes) may stay in the
heap (a few MB of slack). The --quick / test
sizes have buffers < 32 MB, so those workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block >= 64 KB
mmapped), which makes their memory numbers meaningful but adds page-fault time to every allocation: --quick
timings are a smoke test only. Minor page faults per run are recorded.

Timing: wall clock (``time.perf_counter``) and process CPU time (user + sys) around forward + backward.
The machine is shared, so the order of the variants is rotated per rep (hidden-state variants each in their own
process, the logits variants of one rep in one process), and medians are reported; a ratio is the median of the
per-rep ratios to the same rep's sampled baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
_RESULT_TAG = "@@RESULT "
MB = 1024 * 1024

FULL = {
    "vocab": 151936,  # Qwen2/2.5/3 vocabulary
    "hidden": 256,
    "ts": [1024, 2048, 8192],
    "chunk": 1024,  # the library default chunk_size
    "beta": 0.5,
    "reps": {"1024": 3, "2048": 3, "4096": 3, "8192": 1},
    # the trainer's logits path; T=8192 without the sampled baseline (its autograd log-softmax in float32 would need
    # ~20 GB here): peak memory of ours and top-k only
    "logits_ts": {"float32": [1024, 2048, 4096, 8192], "bfloat16": [1024, 2048, 4096, 8192]},
    "logits_memory_only_ts": {"float32": [8192], "bfloat16": [8192]},
    "liger_variants": ["liger_hidden", "liger_compiled_hidden"],
    "topk": 20,  # opd.topk's default
    "naive_probe_t": 256,
    "check_t": 256,
    "seed": 0,
    "isolate": True,
    "malloc_mmap_threshold": None,  # glibc default (blocks >= 32 MB are mmapped)
}
QUICK = {
    "vocab": 16384,
    "hidden": 128,
    "ts": [256, 512],
    "chunk": 64,
    "beta": 0.5,
    "reps": {"256": 2, "512": 2},
    "logits_ts": {"float32": [256, 512], "bfloat16": [256]},
    "liger_variants": ["liger_hidden"],  # compile takes longer than the whole quick run
    "topk": 20,
    "naive_probe_t": 256,
    "check_t": 200,
    "seed": 0,
    "isolate": False,
    "malloc_mmap_threshold": 65536,
}


# ==========================================================================================================
# worker side (runs in a subprocess; imports torch)
# ==========================================================================================================
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sampled_fn():
    import torch
    import torch.nn.functional as F

    class _ChunkedSampledLogp(torch.autograd.Function):
        """log softmax(h W^T)[ids] per token, chunk by chunk in both passes (the sampled-support baseline)."""

        @staticmethod
        def forward(ctx, h, w, ids, chunk):
            n = h.shape[0]
            out = torch.empty(n, dtype=torch.float32)
            lse = torch.empty(n, dtype=torch.float32)
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                z = F.linear(h[a:b], w)
                lse[a:b] = torch.logsumexp(z, dim=-1)
                out[a:b] = z.gather(-1, ids[a:b, None]).squeeze(-1) - lse[a:b]
                del z
            ctx.save_for_backward(h, w, ids, lse)
            ctx.chunk = chunk
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            h, w, ids, lse = ctx.saved_tensors
            chunk = ctx.chunk
            n = h.shape[0]
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                gb = g[a:b].unsqueeze(-1)
                # d logp[y] / dz = onehot(y) - softmax(z), times the incoming gradient
                gz = F.linear(h[a:b], w).sub_(lse[a:b, None]).exp_().mul_(-gb)
                gz.scatter_add_(-1, ids[a:b, None], gb)
                if need_h:
                    grad_h[a:b] = gz @ w
                if need_w:
                    grad_w.addmm_(gz.t(), h[a:b])
                del gz
            return grad_h, grad_w, None, None

    def sampled_logp_from_hidden(h, w, ids, chunk):
        return _ChunkedSampledLogp.apply(h, w, ids, int(chunk))

    return sampled_logp_from_hidden


def _hidden_inputs(t: int, v: int, h: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = 3.0 / math.sqrt(h)  # logits with std ~3
    hs = torch.randn(t, h, generator=g)
    ws = torch.randn(v, h, generator=g) * scale
    ht = hs + 0.5 * torch.randn(t, h, generator=g)
    wt = ws + 0.5 * scale * torch.randn(v, h, generator=g)
    ids = torch.randint(v, (t,), generator=g)
    q = -10.0 * torch.rand(t, generator=g)  # the teacher's log-prob of the sampled token (an input)
    return {"hs": hs, "ws": ws, "ht": ht, "wt": wt, "ids": ids, "q": q}


def _logits_inputs(t: int, v: int, seed: int, dtype=None) -> dict:
    """Student / teacher logits ``[t, v]`` in ``dtype`` (default float32), generated 1024 rows at a time so that the
    generation needs no float32 ``[t, v]`` temporaries (at T=8192 those alone would be 10 GB)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.empty(t, v, dtype=dtype), torch.empty(t, v, dtype=dtype)
    for a in range(0, t, 1024):
        b = min(a + 1024, t)
        block = torch.randn(b - a, v, generator=g).mul_(3.0)
        zs[a:b] = block
        zt[a:b] = torch.randn(b - a, v, generator=g).mul_(1.5).add_(block, alpha=0.8)
        del block
    ids = torch.randint(v, (t,), generator=g)
    q = -10.0 * torch.rand(t, generator=g)
    return {"zs": zs, "zt": zt, "ids": ids, "q": q}


def _nbytes(inputs: dict) -> int:
    return sum(x.numel() * x.element_size() for x in inputs.values())


def _run_variant(variant: str, x: dict, chunk: int, beta: float, rows: int | None = None, topk: int = 20) -> None:
    """One forward + backward of ``variant`` on inputs ``x`` (first ``rows`` tokens if given)."""
    import torch
    import torch.nn.functional as F

    from opd_verl.algorithms.divergences import (
        chunked_divergence_from_hidden,
        chunked_full_divergence,
        chunked_teacher_topk,
        chunked_topk_divergence,
        full_divergence,
        sampled_reverse_kl,
    )

    def rows_of(t):
        return t if rows is None else t[:rows]

    if variant.endswith("_hidden"):
        hs = rows_of(x["hs"]).detach().requires_grad_(True)
        ws = x["ws"].detach().requires_grad_(True)
        ht, wt = rows_of(x["ht"]), x["wt"]
        if variant == "ours_hidden":
            out = chunked_divergence_from_hidden(hs, ws, ht, wt, "jsd", beta, chunk_size=chunk).mean()
        elif variant == "sampled_hidden":
            s = _sampled_fn()(hs, ws, rows_of(x["ids"]), chunk)
            out = sampled_reverse_kl(s, rows_of(x["q"]), "k1").mean()
        elif variant == "naive_hidden":
            zs = F.linear(hs, ws)
            with torch.no_grad():
                zt = F.linear(ht, wt)
            out = full_divergence(zs, zt, "jsd", beta).mean()
        elif variant in ("liger_hidden", "liger_compiled_hidden"):
            from bench_common import liger_jsd_loss

            out = liger_jsd_loss(beta, chunk, compiled=variant == "liger_compiled_hidden")(hs, ws, ht, wt,
                                                                                          rows_of(x["ids"]))
        else:
            raise ValueError(variant)
        out.backward()
        return
    zs = rows_of(x["zs"]).detach().requires_grad_(True)
    zt = rows_of(x["zt"])
    if variant == "ours_logits":
        out = chunked_full_divergence(zs, zt, "jsd", beta, chunk_size=chunk)
    elif variant == "topk_logits":  # the teacher's top-k taken in the timed region, as the loss does
        ids, lt = chunked_teacher_topk(zt, topk, 1.0, chunk)
        out = chunked_topk_divergence(zs, ids, lt, "jsd", beta, chunk_size=chunk)
    elif variant == "sampled_logits":  # log-probs in float32, as the sampled path computes them from bf16 logits
        s = torch.log_softmax(zs.float(), dim=-1).gather(-1, rows_of(x["ids"])[:, None]).squeeze(-1)
        out = sampled_reverse_kl(s, rows_of(x["q"]), "k1")
    elif variant == "naive_logits":
        out = full_divergence(zs, zt, "jsd", beta)
    else:
        raise ValueError(variant)
    out.mean().backward()


def _measure(variant: str, x: dict, chunk: int, beta: float, topk: int = 20) -> dict:
    """Warm up on 8 tokens, reset the peak-RSS mark, then time one forward + backward and read the peak."""
    import gc

    # warm-up; a compiled variant on one full chunk (the shapes of the timed run, so it does not recompile there)
    _run_variant(variant, x, chunk, beta, rows=chunk if "compiled" in variant else 8, topk=topk)
    gc.collect()
    _reset_peak_rss()
    base_kb = _status_kb("VmRSS")
    f0, c0, t0 = _minflt(), _cpu_s(), time.perf_counter()
    _run_variant(variant, x, chunk, beta, topk=topk)
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - c0
    faults = _minflt() - f0
    hwm_kb = _status_kb("VmHWM")
    gc.collect()
    return {
        "variant": variant,
        "wall_s": wall,
        "cpu_s": cpu,
        # VmRSS can read a page above the freshly reset VmHWM (per-thread RSS counters are synced lazily), so a
        # run that allocates nothing can come out at -4 KB: clamp at 0.
        "peak_mb": max(hwm_kb - base_kb, 0) / 1024,
        "minor_page_faults": faults,
        "baseline_rss_mb": base_kb / 1024,
        "loadavg_1m": os.getloadavg()[0],
    }


def _check(v: int, h: int, t: int, chunk: int, beta: float, seed: int) -> dict:
    """Chunked vs unchunked on the same inputs: values and gradients (ours from hidden, ours from logits,
    and the bench's own sampled baseline vs plain autograd)."""
    import torch
    import torch.nn.functional as F

    from opd_verl.algorithms.divergences import (
        chunked_divergence_from_hidden,
        chunked_full_divergence,
        full_divergence,
        sampled_reverse_kl,
    )

    x = _hidden_inputs(t, v, h, seed)

    def leaves():
        return x["hs"].clone().requires_grad_(True), x["ws"].clone().requires_grad_(True)

    def cmp(a, b):
        a, b = a.detach(), b.detach()
        return {"max_abs_diff": float((a - b).abs().max()), "max_abs_ref": float(b.abs().max())}

    hs1, ws1 = leaves()
    v1 = chunked_divergence_from_hidden(hs1, ws1, x["ht"], x["wt"], "jsd", beta, chunk_size=chunk)
    v1.sum().backward()
    hs2, ws2 = leaves()
    zs2 = F.linear(hs2, ws2)
    zt = F.linear(x["ht"], x["wt"])
    v2 = full_divergence(zs2, zt, "jsd", beta)
    v2.sum().backward()

    zs3 = zs2.detach().clone().requires_grad_(True)
    v3 = chunked_full_divergence(zs3, zt, "jsd", beta, chunk_size=chunk)
    v3.sum().backward()
    zs4 = zs2.detach().clone().requires_grad_(True)
    v4 = full_divergence(zs4, zt, "jsd", beta)
    v4.sum().backward()

    hs5, ws5 = leaves()
    s5 = _sampled_fn()(hs5, ws5, x["ids"], chunk)
    sampled_reverse_kl(s5, x["q"], "k1").sum().backward()
    hs6, ws6 = leaves()
    s6 = torch.log_softmax(F.linear(hs6, ws6), dim=-1).gather(-1, x["ids"][:, None]).squeeze(-1)
    sampled_reverse_kl(s6, x["q"], "k1").sum().backward()

    # the float64 reference of both (the float32 naive path is itself only accurate to ~1e-5 here)
    hs7, ws7 = (y.detach().double().requires_grad_(True) for y in (x["hs"], x["ws"]))
    zt7 = F.linear(x["ht"].double(), x["wt"].double())
    v7 = full_divergence(F.linear(hs7, ws7), zt7, "jsd", beta)
    v7.sum().backward()
    zs8 = zs2.detach().double().requires_grad_(True)
    v8 = full_divergence(zs8, zt.double(), "jsd", beta)
    v8.sum().backward()

    def vs64(a, b):
        return cmp(a.double(), b)

    return {
        "T": t,
        "chunk": chunk,
        "vocab": v,
        "hidden": h,
        "vs_float64": {
            "ours_hidden": {"value": vs64(v1, v7), "grad_hidden": vs64(hs1.grad, hs7.grad),
                            "grad_weight": vs64(ws1.grad, ws7.grad)},
            "naive_hidden_float32": {"value": vs64(v2, v7), "grad_hidden": vs64(hs2.grad, hs7.grad),
                                     "grad_weight": vs64(ws2.grad, ws7.grad)},
            "ours_logits": {"value": vs64(v3, v8), "grad_logits": vs64(zs3.grad, zs8.grad)},
            "naive_logits_float32": {"value": vs64(v4, v8), "grad_logits": vs64(zs4.grad, zs8.grad)},
        },
        "ours_hidden_vs_naive": {
            "value": cmp(v1, v2),
            "grad_hidden": cmp(hs1.grad, hs2.grad),
            "grad_weight": cmp(ws1.grad, ws2.grad),
        },
        "ours_logits_vs_naive": {"value": cmp(v3, v4), "grad_logits": cmp(zs3.grad, zs4.grad)},
        "sampled_hidden_vs_autograd": {
            "value": cmp(s5, s6),
            "grad_hidden": cmp(hs5.grad, hs6.grad),
            "grad_weight": cmp(ws5.grad, ws6.grad),
        },
    }


def _do_job(job: dict) -> dict:
    import gc

    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    kind = job["kind"]
    if kind == "check":
        return _check(job["vocab"], job["hidden"], job["T"], job["chunk"], job["beta"], job["seed"])
    if kind == "hidden":
        x = _hidden_inputs(job["T"], job["vocab"], job["hidden"], job["seed"])
    elif kind == "logits":
        x = _logits_inputs(job["T"], job["vocab"], job["seed"], getattr(torch, job.get("dtype", "float32")))
    else:
        raise ValueError(kind)
    res = {"inputs_mb": _nbytes(x) / MB, "threads": torch.get_num_threads(), "runs": []}
    for variant in job["variants"]:
        res["runs"].append(_measure(variant, x, job["chunk"], job["beta"], job.get("topk", 20)))
    del x
    gc.collect()
    return res


def worker_main() -> None:
    """Read one JSON job per stdin line, answer one ``@@RESULT {json}`` line per job; exit on EOF."""
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            out = {"ok": True, "result": _do_job(job)}
        except Exception as e:  # reported to the parent, which records it
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(_RESULT_TAG + json.dumps(out) + "\n")
        sys.stdout.flush()


# ==========================================================================================================
# parent side (no torch tensors here)
# ==========================================================================================================
def _meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class _Worker:
    """A worker subprocess; a watchdog thread kills it if its RSS exceeds ``rss_limit_mb``."""

    def __init__(self, rss_limit_mb: float, extra_env: dict | None = None):
        env = {**os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.rss_limit_mb = rss_limit_mb
        self.killed_at_mb: float | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        path = f"/proc/{self.proc.pid}/status"
        while not self._stop.wait(0.2):
            try:
                with open(path) as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
            except (OSError, StopIteration):
                return
            if rss > self.rss_limit_mb:
                self.killed_at_mb = rss
                self.proc.kill()
                return

    def run(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_RESULT_TAG):
                return json.loads(line[len(_RESULT_TAG) :])
        self.proc.wait()
        why = f"killed by the watchdog at RSS {self.killed_at_mb:.0f} MB" if self.killed_at_mb else "worker died"
        return {"ok": False, "error": f"{why} (exit code {self.proc.returncode})"}

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _machine() -> dict:
    """bench_common.machine_info plus what a memory benchmark also needs."""
    import torch  # only for the thread count; the parent allocates no tensors

    from bench_common import machine_info

    return {
        **machine_info(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_gb": _meminfo_kb("MemTotal") / 1024**2,
        "mem_available_gb_at_start": _meminfo_kb("MemAvailable") / 1024**2,
    }


def _cpu_pass_bytes() -> int:
    from opd_verl.algorithms.divergences.passes import _CPU_PASS_BYTES

    return _CPU_PASS_BYTES


def _summ(runs: list[dict]) -> dict:
    return {
        "wall_s": [r["wall_s"] for r in runs],
        "cpu_s": [r["cpu_s"] for r in runs],
        "peak_mb": [r["peak_mb"] for r in runs],
        "minor_page_faults": [r["minor_page_faults"] for r in runs],
        "median_wall_s": median(r["wall_s"] for r in runs),
        "median_cpu_s": median(r["cpu_s"] for r in runs),
        "median_peak_mb": median(r["peak_mb"] for r in runs),
        "loadavg_1m": [r["loadavg_1m"] for r in runs],
    }


def run_benchmark(cfg: dict, log=print) -> dict:
    """Run all measurements of ``cfg`` (see FULL / QUICK) and return the JSON-able result dict."""
    t_start = time.perf_counter()
    cfg = dict(cfg)
    v, h, chunk, beta, seed = cfg["vocab"], cfg["hidden"], cfg["chunk"], cfg["beta"], cfg["seed"]
    mem_avail_mb = _meminfo_kb("MemAvailable") / 1024
    budget_mb = cfg.get("mem_budget_mb") or 0.6 * mem_avail_mb  # naive runs only if predicted to fit this
    rss_limit_mb = cfg.get("rss_limit_mb") or 0.85 * mem_avail_mb  # watchdog: kill any worker above this
    shared: _Worker | None = None
    worker_env = {}
    if cfg.get("malloc_mmap_threshold"):
        worker_env["MALLOC_MMAP_THRESHOLD_"] = str(cfg["malloc_mmap_threshold"])

    def run_job(job: dict, label: str) -> dict:
        nonlocal shared
        if cfg["isolate"]:
            w = _Worker(rss_limit_mb, worker_env)
            try:
                out = w.run(job)
            finally:
                w.close()
        else:
            if shared is None or shared.proc.poll() is not None:
                shared = _Worker(rss_limit_mb, worker_env)
            out = shared.run(job)
        el = time.perf_counter() - t_start
        if not out["ok"]:
            log(f"[{el:6.0f}s] {label}: ERROR {out['error']}", flush=True)
            return out
        res = out["result"]
        for r in res.get("runs", []):
            log(
                f"[{el:6.0f}s] {label} {r['variant']:<15} wall {r['wall_s']:7.2f}s  cpu {r['cpu_s']:7.2f}s  "
                f"peak +{r['peak_mb']:7.0f} MB  (load {r['loadavg_1m']:.1f})",
                flush=True,
            )
        return out

    base = {"vocab": v, "hidden": h, "chunk": chunk, "beta": beta, "seed": seed, "threads": cfg.get("threads")}
    from bench_common import liger_available

    liger = liger_available() if cfg["liger_variants"] else None
    result: dict[str, Any] = {
        "benchmark": "full_vocab_divergence",
        "command": " ".join([".venv/bin/python", "bench/full_vocab_divergence.py", *cfg.get("argv", [])]),
        "machine": _machine(),
        "settings": {
            **{k: cfg[k] for k in ("vocab", "hidden", "ts", "chunk", "beta", "reps", "logits_ts", "seed", "topk")},
            "logits_memory_only_ts": cfg.get("logits_memory_only_ts", {}),
            "torch_threads_per_worker": cfg.get("threads") or "torch's default (the machine's cores)",
            "liger_kernel": liger or "not installed (pip install --no-deps liger-kernel==0.8.5): Liger variants skipped",
            "cpu_pass_bytes": _cpu_pass_bytes(),
            "naive_probe_t": cfg["naive_probe_t"],
            "check_t": cfg["check_t"],
            "dtype": "float32 hidden states; logits groups per dtype (float32, bfloat16: inputs and gradient in that "
            "dtype, computed in float32)",
            "divergence": "jsd (beta=0.5), temperature 1, loss = mean of the per-token values, fwd + bwd",
            "sampled_baseline": "k1 = log pi_s(x_t) - log pi_t(x_t) with log pi_s(x_t) from the student's full "
            "log-softmax: from hidden via a chunked custom autograd Function (same chunk size, saves the [T] "
            "logsumexp, analytic backward onehot - softmax); from logits via plain autograd log_softmax + gather",
            "gradients": "student hidden states and student lm-head weight (from hidden); student logits (from logits)",
            "liger": "LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta, chunk_size=chunk), eager "
            "and compiled=True (torch.compile, warmed up on one chunk before the timed run); same inputs",
            "topk_logits": "chunked_teacher_topk(teacher logits, topk) + chunked_topk_divergence, both in the timed run",
            "isolate": cfg["isolate"],
            "worker_env": worker_env,
            "memory_method": "peak = VmHWM - VmRSS (/proc/self/status) after resetting the peak mark with "
            "/proc/self/clear_refs=5, once inputs exist and an 8-token warm-up ran; includes returned gradients",
            "timing_method": "wall (perf_counter) and CPU (getrusage user+sys) time of one fwd+bwd; hidden variants "
            "one process each, logits variants of a rep in one process; order rotated per rep; medians; ratio = "
            "median of the per-rep ratios to the sampled baseline of the same rep",
            "mem_budget_mb_for_naive": budget_mb,
            "watchdog_rss_limit_mb": rss_limit_mb,
        },
    }
    log(
        f"full_vocab_divergence: V={v} H={h} chunk={chunk} T={cfg['ts']} isolate={cfg['isolate']} "
        f"(mem available {mem_avail_mb / 1024:.1f} GB, naive budget {budget_mb / 1024:.1f} GB)",
        flush=True,
    )
    try:
        # 1. correctness: chunked == unchunked on the same inputs
        chk = run_job({**base, "kind": "check", "T": cfg["check_t"], "chunk": max(1, cfg["check_t"] // 3)}, "check")
        result["check"] = chk["result"] if chk["ok"] else {"error": chk["error"]}
        if chk["ok"]:
            c = chk["result"]
            log(
                "[check] max |chunked - unchunked|: ours_hidden value "
                f"{c['ours_hidden_vs_naive']['value']['max_abs_diff']:.2e}, grad_w "
                f"{c['ours_hidden_vs_naive']['grad_weight']['max_abs_diff']:.2e}; ours_logits value "
                f"{c['ours_logits_vs_naive']['value']['max_abs_diff']:.2e}; vs float64: ours value "
                f"{c['vs_float64']['ours_logits']['value']['max_abs_diff']:.2e} (naive float32 "
                f"{c['vs_float64']['naive_logits_float32']['value']['max_abs_diff']:.2e}); sampled value "
                f"{c['sampled_hidden_vs_autograd']['value']['max_abs_diff']:.2e}",
                flush=True,
            )

        # 2. naive memory probe at a small T, to extrapolate its (linear in T) peak
        probe_t = cfg["naive_probe_t"]
        pr = (run_job({**base, "kind": "hidden", "T": probe_t, "variants": ["naive_hidden"]}, f"T={probe_t:<5d}")
              if cfg["ts"] else {"ok": False, "error": "no hidden-state group"})
        bytes_per_logit = None
        naive_by_t: dict[int, dict] = {}
        if pr["ok"]:
            prun = pr["result"]["runs"][0]
            bytes_per_logit = prun["peak_mb"] * MB / (probe_t * v)
            naive_by_t[probe_t] = {**_summ([prun]), "inputs_mb": pr["result"]["inputs_mb"]}
        result["naive_probe"] = {"T": probe_t, "bytes_per_logit_element": bytes_per_logit}

        # 3. per T: the hidden-state group (ours, sampled, Liger eager/compiled; each run in its own process, order
        #    rotated per rep), naive if it fits, then the logits groups per dtype (variants in one process per rep)
        def run_group(t: int, kind: str, variants: list[str], reps: int, extra: dict, together: bool) -> dict:
            runs: dict[str, list] = {v_: [] for v_ in variants}
            inputs_mb = None
            for r in range(reps):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                jobs = [order] if together else [[v_] for v_ in order]
                for vs in jobs:
                    out = run_job({**base, **extra, "kind": kind, "T": t, "variants": vs},
                                  f"T={t:<5d} {extra.get('dtype', '')} rep {r + 1}/{reps}")
                    if out["ok"]:
                        for run in out["result"]["runs"]:
                            runs[run["variant"]].append(run)
                        inputs_mb = out["result"]["inputs_mb"]
            group: dict[str, Any] = {"inputs_mb": inputs_mb, "reps": reps}
            for v_, rs in runs.items():
                group[v_] = _summ(rs) if rs else {"error": "no successful run"}
            baseline = next((v_ for v_ in variants if v_.startswith("sampled")), None)
            if baseline:
                group["ratio_wall_median"], group["ratio_cpu_median"] = {}, {}
                for v_ in variants:
                    pairs = [(a["wall_s"] / b["wall_s"], a["cpu_s"] / b["cpu_s"])
                             for a, b in zip(runs[v_], runs[baseline])]
                    if v_ != baseline and pairs:
                        group["ratio_wall_median"][v_] = median(p_[0] for p_ in pairs)
                        group["ratio_cpu_median"][v_] = median(p_[1] for p_ in pairs)
            return group

        rows = []
        for t in cfg["ts"]:
            reps = int(cfg["reps"].get(str(t), 1))
            variants = ["ours_hidden", "sampled_hidden"] + (cfg["liger_variants"] if liger else [])
            row: dict[str, Any] = {"T": t, "hidden": run_group(t, "hidden", variants, reps, {}, together=False)}

            # naive (materialised logits + autograd), if the extrapolated peak fits the budget
            if t in naive_by_t:
                row["naive_hidden"] = naive_by_t[t]
            elif bytes_per_logit is None:
                row["naive_hidden"] = {"skipped": "naive probe failed"}
            else:
                need_mb = bytes_per_logit * t * v / MB
                if need_mb > budget_mb:
                    row["naive_hidden"] = {
                        "skipped": f"would need ~{need_mb / 1024:.1f} GB (extrapolated from T={probe_t}: "
                        f"{bytes_per_logit:.1f} B per logit element) > budget {budget_mb / 1024:.1f} GB",
                        "predicted_peak_mb": need_mb,
                    }
                    log(f"[{time.perf_counter() - t_start:6.0f}s] T={t:<5d} naive_hidden: {row['naive_hidden']['skipped']}")
                else:
                    out = run_job({**base, "kind": "hidden", "T": t, "variants": ["naive_hidden"]}, f"T={t:<5d}")
                    row["naive_hidden"] = (
                        {**_summ(out["result"]["runs"]), "predicted_peak_mb": need_mb}
                        if out["ok"]
                        else {"error": out["error"], "predicted_peak_mb": need_mb}
                    )
            rows.append(row)

        # 4. pre-materialised logits (the trainer's path): ours (chunked_full_divergence), top-k (the teacher's top-k
        #    + chunked_topk_divergence) and the sampled log_softmax + gather, per dtype; memory-only T without sampled
        logit_rows = []
        for dtype, ts_ in cfg["logits_ts"].items():
            for t in ts_:
                memory_only = t in cfg.get("logits_memory_only_ts", {}).get(dtype, [])
                variants = ["ours_logits", "topk_logits"] + ([] if memory_only else ["sampled_logits"])
                reps = 1 if memory_only else int(cfg["reps"].get(str(t), 1))
                group = run_group(t, "logits", variants, reps, {"dtype": dtype, "topk": cfg["topk"]}, together=True)
                logit_rows.append({"T": t, "dtype": dtype, "memory_only": memory_only, **group})
        result["logits"] = logit_rows
        result["results"] = rows
        result["naive_small_t"] = {str(k): v_ for k, v_ in naive_by_t.items() if k not in cfg["ts"]}
    finally:
        if shared is not None:
            shared.close()

    result["summary"] = _summary(result, cfg)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


RATIO_TARGET = 2.0  # issue: full vocabulary <= 2x the sampled-token KL on the trainer's logits path


def _summary(result: dict, cfg: dict) -> dict:
    def med(group: dict, variant: str, field: str = "median_wall_s"):
        return (group.get(variant) or {}).get(field)

    hidden = []
    for r in result.get("results", []):
        g = r["hidden"]
        naive = r.get("naive_hidden") or {}
        ratios = g.get("ratio_wall_median", {})
        hidden.append({
            "T": r["T"],
            "time_ours_s": med(g, "ours_hidden"),
            "time_sampled_s": med(g, "sampled_hidden"),
            "time_liger_s": med(g, "liger_hidden"),
            "time_liger_compiled_s": med(g, "liger_compiled_hidden"),
            "ratio_ours": ratios.get("ours_hidden"),
            "ratio_liger": ratios.get("liger_hidden"),
            "ratio_liger_compiled": ratios.get("liger_compiled_hidden"),
            "peak_mb_ours": med(g, "ours_hidden", "median_peak_mb"),
            "peak_mb_sampled": med(g, "sampled_hidden", "median_peak_mb"),
            "peak_mb_liger_compiled": med(g, "liger_compiled_hidden", "median_peak_mb"),
            "peak_mb_naive": naive.get("median_peak_mb") if "median_peak_mb" in naive else naive.get("skipped"),
        })
    logits = []
    for g in result.get("logits", []):
        ratios = g.get("ratio_wall_median", {})
        logits.append({
            "T": g["T"], "dtype": g["dtype"],
            "time_ours_s": med(g, "ours_logits"), "time_topk_s": med(g, "topk_logits"),
            "time_sampled_s": med(g, "sampled_logits"),
            "ratio_ours": ratios.get("ours_logits"), "ratio_topk": ratios.get("topk_logits"),
            "peak_mb_ours": med(g, "ours_logits", "median_peak_mb"),
            "peak_mb_topk": med(g, "topk_logits", "median_peak_mb"),
            "peak_mb_sampled": med(g, "sampled_logits", "median_peak_mb"),
        })
    summary: dict[str, Any] = {"hidden": hidden, "logits": logits, "ratio_target": RATIO_TARGET}
    ratios = [x["ratio_ours"] for x in logits if x["ratio_ours"] is not None]
    if ratios:
        summary["logits_ratio_max"] = max(ratios)
        summary["logits_ratio_target_met"] = max(ratios) <= RATIO_TARGET
    versus = [(x["T"], x["time_ours_s"] / x[k]) for x in hidden for k in ("time_liger_s", "time_liger_compiled_s")
              if x["time_ours_s"] and x[k]]
    if versus:
        summary["ours_over_liger_max"] = max(r for _, r in versus)
        summary["ours_no_slower_than_liger"] = summary["ours_over_liger_max"] <= 1.0
    topk_vs_full = [(x["T"], x["dtype"], x["peak_mb_topk"], x["peak_mb_ours"]) for x in logits
                    if x["peak_mb_topk"] is not None and x["peak_mb_ours"] is not None]
    if topk_vs_full:
        summary["topk_peak_le_full"] = all(k <= f * 1.02 + 1 for _, _, k, f in topk_vs_full)  # 2% + 1 MB slack
    peaks = [x["peak_mb_ours"] for x in hidden if x["peak_mb_ours"] is not None and x["T"] >= 2 * cfg["chunk"]]
    if len(peaks) >= 2:
        # from two chunks on (a single-chunk run can hold one [chunk, V] buffer less)
        summary["ours_hidden_peak_growth_over_T_ge_2chunk"] = max(peaks) / min(peaks)
    return summary


def _plot_memory(result: dict, path: Path) -> str | None:
    """PNG of peak extra memory vs T (log-log), the naive run's extrapolated peaks dashed; None without data."""
    from opd_verl.demo.plots import plot_panels

    series: dict[str, list[tuple[float, float]]] = {"ours": [], "sampled": [], "naive": [], "naive (extrapolated)": []}
    for r in result.get("results", []):
        for key, name in (("ours_hidden", "ours"), ("sampled_hidden", "sampled")):
            if (r["hidden"].get(key) or {}).get("median_peak_mb"):
                series[name].append((r["T"], r["hidden"][key]["median_peak_mb"]))
        n = r.get("naive_hidden") or {}
        if n.get("median_peak_mb"):
            series["naive"].append((r["T"], n["median_peak_mb"]))
        elif n.get("predicted_peak_mb"):
            series["naive (extrapolated)"].append((r["T"], n["predicted_peak_mb"]))
    for k, n in (result.get("naive_small_t") or {}).items():
        series["naive"].append((int(k), n["median_peak_mb"]))
    series["naive"].sort()
    if series["naive"] and series["naive (extrapolated)"]:
        series["naive (extrapolated)"].insert(0, series["naive"][-1])
    ts = sorted({t for pts in series.values() for t, mb in pts if mb > 0})
    if not ts:
        return None
    colors = {"ours": (31, 119, 180), "sampled": (44, 160, 44), "naive": (214, 39, 40), "naive (extrapolated)": (214, 39, 40)}
    lines = [(name, pts, colors[name], *(("dashed",) if "extrapolated" in name else ())) for name, pts in series.items() if pts]
    s = result["settings"]
    return plot_panels([("peak extra RSS (MB, log scale)", lines, None, None)], path,
                       f"Peak extra RSS vs T: JSD fwd+bwd, V={s['vocab']}, H={s['hidden']}, chunk={s['chunk']}",
                       xlabel="T (tokens, log scale)", logx=True, logy=True, xticks=ts)


def _print_table(result: dict, log=print) -> None:
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    s = result["summary"]
    log("\nfrom hidden states (float32): seconds fwd+bwd, ratio to the sampled baseline; peak extra MB")
    log("  T      ours  sampled  Liger  Liger-compiled | ratio ours  Liger  compiled | peak ours / sampled")
    for x in s["hidden"]:
        log(f"  {x['T']:<6d} {f(x['time_ours_s'], '5.2f')}  {f(x['time_sampled_s'], '6.2f')}  "
            f"{f(x['time_liger_s'], '6.2f')}  {f(x['time_liger_compiled_s'], '6.2f')}         | "
            f"{f(x['ratio_ours'], '5.2f')}      {f(x['ratio_liger'], '5.2f')}  {f(x['ratio_liger_compiled'], '5.2f')}"
            f"     | {f(x['peak_mb_ours'], '.0f')} / {f(x['peak_mb_sampled'], '.0f')}")
    log("\non logits (the trainer's path): seconds fwd+bwd, ratio to the sampled baseline; peak extra MB")
    log("  T      dtype     full   top-k  sampled | ratio full  top-k | peak full / top-k / sampled")
    for x in s["logits"]:
        log(f"  {x['T']:<6d} {x['dtype']:<8s} {f(x['time_ours_s'], '5.2f')}  {f(x['time_topk_s'], '5.2f')}  "
            f"{f(x['time_sampled_s'], '6.2f')}  | {f(x['ratio_ours'], '5.2f')}      {f(x['ratio_topk'], '5.2f')}  | "
            f"{f(x['peak_mb_ours'], '.0f')} / {f(x['peak_mb_topk'], '.0f')} / {f(x['peak_mb_sampled'], '.0f')}")
    if "logits_ratio_target_met" in s:
        log(f"  full <= {s['ratio_target']}x sampled on logits: {s['logits_ratio_target_met']} "
            f"(max {s['logits_ratio_max']:.2f}x)")
    if "ours_no_slower_than_liger" in s:
        log(f"  ours no slower than Liger (eager and compiled): {s['ours_no_slower_than_liger']} "
            f"(ours / Liger max {s['ours_over_liger_max']:.2f})")
    if "topk_peak_le_full" in s:
        log(f"  top-k peak <= full peak: {s['topk_peak_le_full']}")


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    p.add_argument("--reps", type=int, default=None, help="repetitions for every T (default: per-T preset)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ts", type=int, nargs="*", default=None,
                   help="T of the hidden-state group (default the preset's; none: skip the group)")
    p.add_argument("--logits-ts", nargs="*", default=None, metavar="DTYPE:T,T",
                   help="T per dtype of the logits groups, e.g. float32:1024,8192 bfloat16:1024 (default the preset's; "
                   "none: skip them)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default torch's; 1 keeps the ratios sane when another job "
                   "holds a core: OpenMP threads that wait for a descheduled peer slow every op)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main()
        return None
    cfg = dict(QUICK if args.quick else FULL)
    cfg["argv"] = argv
    if args.hidden is not None:
        cfg["hidden"] = args.hidden
    if args.chunk is not None:
        cfg["chunk"] = args.chunk
    if args.threads is not None:
        cfg["threads"] = args.threads
    if args.ts is not None:
        cfg["ts"] = args.ts
    if args.logits_ts is not None:
        cfg["logits_ts"] = {d: [int(t) for t in ts.split(",")] for d, ts in (x.split(":") for x in args.logits_ts)}
    if args.reps is not None:
        cfg["reps"] = {str(t): args.reps for t in {*cfg["ts"], *(t for ts in cfg["logits_ts"].values() for t in ts)}}
    out = args.out or RESULTS / ("full_vocab_divergence_quick.json" if args.quick else "full_vocab_divergence.json")
    result = run_benchmark(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot_memory(result, out.with_name(out.stem + "_memory.png"))
    _print_table(result)
    print(f"\nwrote {out} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
