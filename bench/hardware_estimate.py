"""Rough hardware estimate of each GPU recipe: GPU memory per GPU and host memory per node, from parameter counts.

`.venv/bin/python bench/hardware_estimate.py` prints a markdown table (one row per recipe in recipes/ that runs on
GPUs). An estimate, not a measurement: the terms and their byte counts are below; what it leaves out (CUDA context,
NCCL buffers, allocator fragmentation, vLLM's CUDA graphs) is a few GB per GPU more.

Parameter counts come from each model's architecture (the fields of its Hugging Face config.json, in `MODELS`);
`param_count` is checked against transformers' own models (tests/test_hardware_estimate.py, on the meta device).

Per GPU (N = trainer.nnodes x n_gpus_per_node ranks, everything FSDP-sharded over N):
- actor (the student, resident during generation and training): parameters in actor.fsdp_config.model_dtype
  (verl's default fp32: 4 B/param), fp32 gradients (4 B) and fp32 Adam moments (8 B) of the trainable parameters
  (LoRA: only the adapters'), / N; `optimizer_offload` moves the Adam moments, `param_offload` parameters and
  gradients, to host memory.
- rollout: vLLM takes rollout.gpu_memory_utilization x the GPU's memory while it generates (its bf16 weights
  2 B/param / tensor_model_parallel_size, the rest KV cache) and frees it while the actor trains (sleep mode).
  So the GPU needs actor / (1 - utilization), and vLLM's share must hold its weights.
- training micro-batch (T = actor.ppo_max_token_len_per_gpu tokens, dynamic batch size): the student's logits
  T x V in bf16 (2 B) and fp32 (4 B) for the log-softmax, plus gradient checkpoints T x hidden x layers x 2 B
  and one layer's recomputed activations T x (4 hidden + 3 intermediate) x 2 B;
  loss-level topk/full add the fp32 [T, V] gradient kept from forward to backward (4 B), full also the
  teachers' bf16 logits of the response rows (2 B, bounded here by T).
- teacher pass (verl's reference role; forward only, parameters on host between passes): two FSDP units (layers)
  of the teacher gathered in bf16 plus its logits for T tokens (bf16 + fp32).
GPU needed = max(actor / (1 - utilization), actor + training micro-batch, actor + teacher pass).

Host memory per node (each rank keeps its shard on its node's host: one node holds whole models):
- the teachers' parameters in ref.fsdp_config.model_dtype (verl 0.9.1 always offloads a forward-only engine's
  parameters; the recipes set bf16, 2 B/param; verl's default fp32 is 4 B);
- offloaded actor state (optimizer_offload: 8 B/trainable param; param_offload: params + 4 B gradients);
- LoRA students: vLLM sleeps at level 1 (its bf16 weights are copied to host, one copy per tensor-parallel group)
  instead of level 2 (weights dropped, re-sent by the actor).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelShape:
    """The fields of a Qwen2/Qwen3 config.json that fix the parameter count."""

    arch: str  # "qwen2" (q/k/v biases), "qwen3" (q/k RMSNorm, no biases) or "llama" (neither)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # None: hidden // heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


# From each model's config.json on the Hugging Face hub.
MODELS = {
    "Qwen/Qwen2-0.5B": ModelShape("qwen2", 896, 24, 4864, 14, 2, 151936, True),
    "Qwen/Qwen2-7B": ModelShape("qwen2", 3584, 28, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-1.5B": ModelShape("qwen2", 1536, 28, 8960, 12, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape("qwen2", 1536, 28, 8960, 12, 2, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape("qwen2", 3584, 28, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-Coder-7B-Instruct": ModelShape("qwen2", 3584, 28, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-Math-7B-Instruct": ModelShape("qwen2", 3584, 28, 18944, 28, 4, 152064, False),
    "deepseek-ai/deepseek-coder-1.3b-instruct": ModelShape("llama", 2048, 24, 5504, 16, 16, 32256, False),
    "deepseek-ai/deepseek-coder-6.7b-instruct": ModelShape("llama", 4096, 32, 11008, 32, 32, 32256, False),
    "Qwen/Qwen3-1.7B-Base": ModelShape("qwen3", 2048, 28, 6144, 16, 8, 151936, True, 128),
    "Qwen/Qwen3-8B-Base": ModelShape("qwen3", 4096, 36, 12288, 32, 8, 151936, False, 128),
    "Qwen/Qwen3-8B": ModelShape("qwen3", 4096, 36, 12288, 32, 8, 151936, False, 128),
    "Qwen/Qwen3-32B": ModelShape("qwen3", 5120, 64, 25600, 64, 8, 151936, False, 128),
}


def _linears(m: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
    q, kv = m.heads * m.dim, m.kv_heads * m.dim
    return [(m.hidden, q), (m.hidden, kv), (m.hidden, kv), (q, m.hidden),
            (m.hidden, m.intermediate), (m.hidden, m.intermediate), (m.intermediate, m.hidden)]


def layer_param_count(m: ModelShape) -> int:
    """Parameters of one decoder layer."""
    weights = sum(a * b for a, b in _linears(m))
    extra = {"qwen2": (m.heads + 2 * m.kv_heads) * m.dim, "qwen3": 2 * m.dim, "llama": 0}[m.arch]  # qkv biases / q,k norms
    return weights + extra + 2 * m.hidden  # the two RMSNorms


def param_count(m: ModelShape) -> int:
    """All parameters: embeddings, layers, final norm, lm_head (untied)."""
    embed = m.vocab * m.hidden
    return embed * (1 if m.tied else 2) + m.layers * layer_param_count(m) + m.hidden


def lora_param_count(m: ModelShape, rank: int) -> int:
    """LoRA adapters on every linear layer of the decoder (target_modules: all-linear): rank x (in + out) each."""
    return m.layers * sum(rank * (a + b) for a, b in _linears(m))


def _get(cfg: dict, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def estimate(recipe: dict) -> dict:
    """GiB per GPU and per node host of one recipe (its YAML as a dict; verl's defaults where it sets nothing)."""
    arr = recipe.get("actor_rollout_ref", {})
    student = MODELS[_get(arr, "model.path")]
    opd = recipe.get("opd", {})
    teachers = [t["path"] if isinstance(t, dict) else t for t in opd.get("teachers") or []] or [opd["teacher"]["path"]]
    nodes, per_node = int(_get(recipe, "trainer.nnodes", 1)), int(_get(recipe, "trainer.n_gpus_per_node", 8))
    n = nodes * per_node
    actor_bytes = DTYPE_BYTES[_get(arr, "actor.fsdp_config.model_dtype", "fp32")]
    ref_bytes = DTYPE_BYTES[_get(arr, "ref.fsdp_config.model_dtype", "fp32")]
    lora = int(_get(arr, "model.lora_rank", 0) or 0)
    p_s = param_count(student)
    p_train = lora_param_count(student, lora) if lora else p_s
    param_off = bool(_get(arr, "actor.fsdp_config.param_offload", False))
    optim_off = bool(_get(arr, "actor.fsdp_config.optimizer_offload", False))
    weights = p_s * actor_bytes + (p_train * 4 if lora else 0)  # LoRA: the frozen base and fp32 adapters
    grads, adam = p_train * 4, p_train * 8
    gpu_actor = ((0 if param_off else weights + grads) + (0 if optim_off else adam)) / n
    host_actor = ((weights + grads if param_off else 0) + (adam if optim_off else 0)) * per_node / n

    util = float(_get(arr, "rollout.gpu_memory_utilization", 0.5))
    tp = int(_get(arr, "rollout.tensor_model_parallel_size", 2))
    tokens = int(_get(arr, "actor.ppo_max_token_len_per_gpu", 16384))
    support = opd.get("support", "sampled")
    loss_level = _get(arr, "actor.policy_loss.loss_mode") in ("ppo_plus_distill", "opd_distill")
    logit_bytes = 2 + 4 + (4 if loss_level and support in ("topk", "full") else 0)
    logit_bytes += 2 if loss_level and support == "full" else 0
    train_act = (tokens * student.vocab * logit_bytes + tokens * student.hidden * student.layers * 2
                 + tokens * (4 * student.hidden + 3 * student.intermediate) * 2)  # + one layer recomputed
    teacher_shapes = [MODELS[t] for t in teachers]
    teacher_pass = max(2 * layer_param_count(t) * 2 + tokens * t.vocab * 6 for t in teacher_shapes)
    need = max(gpu_actor / (1 - util), gpu_actor + train_act, gpu_actor + teacher_pass)
    p_t = sum(param_count(t) for t in teacher_shapes)
    host_teacher = p_t * ref_bytes * per_node / n
    host_vllm = p_s * 2 * per_node / tp if lora else 0  # sleep level 1: the weights go to host
    return {
        "student_params": p_s, "teacher_params": p_t, "trainable_params": p_train, "ranks": n,
        "gpu_actor": gpu_actor / GIB, "gpu_train_microbatch": train_act / GIB, "gpu_teacher_pass": teacher_pass / GIB,
        "gpu_needed": need / GIB, "vllm_weights_per_gpu": p_s * 2 / tp / GIB, "utilization": util,
        "host_teacher": host_teacher / GIB, "host_actor": host_actor / GIB, "host_vllm": host_vllm / GIB,
        "host_needed": (host_teacher + host_actor + host_vllm) / GIB,
    }


def gpu_recipes() -> dict[str, dict]:
    """{name: YAML as a dict} of the recipes that run main_opd on GPUs. A student that is an SFT recipe's checkpoint
    (header `# Student: the latest checkpoint of recipe <sft> in <dir>`) is that recipe's model."""
    import re

    import yaml

    out = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        text = path.read_text()
        cfg = yaml.safe_load(text)
        if _get(cfg, "trainer.device") != "cuda" or "opd" not in cfg:
            continue
        sft = re.search(r"^# Student: the latest checkpoint of recipe (\S+) in", text, re.M)
        if sft:
            base = yaml.safe_load((REPO / "recipes" / f"{sft.group(1)}.yaml").read_text())
            cfg["actor_rollout_ref"]["model"]["path"] = _get(base, "model.path")
        out[path.stem] = cfg
    return out


def _b(params: int) -> str:
    return f"{params / 1e9:.2f}B"


def table() -> str:
    rows = ["| recipe | student / teacher params (trainable) | GPUs | GPU per GPU: actor + micro-batch, teacher pass "
            "-> needed (vLLM share) | host per node: teacher + offloaded | fits 80 GB GPUs (estimate) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, cfg in gpu_recipes().items():
        e = estimate(cfg)
        share = e["utilization"] * 80
        fits = e["gpu_needed"] <= 80 * 0.93 and share >= e["vllm_weights_per_gpu"] * 1.2
        trainable = f" ({_b(e['trainable_params'])} LoRA)" if e["trainable_params"] != e["student_params"] else ""
        host = f"{e['host_teacher']:.0f} GiB" + (f" + {e['host_actor'] + e['host_vllm']:.0f} GiB" if
                                                 e["host_actor"] + e["host_vllm"] else "")
        rows.append(
            f"| `{name}` | {_b(e['student_params'])} / {_b(e['teacher_params'])}{trainable} | {e['ranks']} | "
            f"{e['gpu_actor']:.1f} + {e['gpu_train_microbatch']:.1f}, {e['gpu_teacher_pass']:.1f} -> "
            f"{math.ceil(e['gpu_needed'])} GiB (vLLM {e['utilization']:g} x GPU, weights "
            f"{e['vllm_weights_per_gpu']:.1f} GiB) | {host} | {'yes' if fits else 'no'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(table())
