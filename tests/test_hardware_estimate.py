"""bench/hardware_estimate.py: the parameter counts against transformers' and peft's own models (meta device, no
weights), and the memory terms of a recipe against the byte counts its docstring states."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import hardware_estimate as he  # noqa: E402


def _hf_config(m: he.ModelShape):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=m.hidden, num_hidden_layers=m.layers, intermediate_size=m.intermediate,
                  num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, vocab_size=m.vocab,
                  tie_word_embeddings=m.tied)
    if m.arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common) if m.arch == "qwen2" else Qwen3Config(head_dim=m.dim, **common)


def _meta_model(m: he.ModelShape):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_hf_config(m))


@pytest.mark.parametrize("name", sorted(he.MODELS))
def test_param_count_is_transformers_count(name):
    model = _meta_model(he.MODELS[name])
    unique = {id(p): p.numel() for p in model.parameters()}  # tied embeddings count once
    assert he.param_count(he.MODELS[name]) == sum(unique.values())


def test_param_counts_of_the_published_models():
    assert he.param_count(he.MODELS["Qwen/Qwen2-0.5B"]) == 494_032_768
    assert he.param_count(he.MODELS["Qwen/Qwen3-8B"]) == 8_190_735_360


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_lora_param_count_is_peft_count(arch):
    from peft import LoraConfig, get_peft_model

    shape = he.ModelShape(arch, 64, 3, 96, 4, 2, 100, False, 32 if arch == "qwen3" else None)
    model = get_peft_model(_meta_model(shape), LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert he.lora_param_count(shape, 8) == trainable


def test_estimate_terms():
    """Full fine-tuning on 2 nodes x 4 GPUs with the optimizer offloaded, and a LoRA student on one node."""
    gib = 1024**3
    shape, teacher = he.MODELS["Qwen/Qwen2-0.5B"], he.MODELS["Qwen/Qwen2-7B"]
    ps, pt = he.param_count(shape), he.param_count(teacher)
    recipe = {
        "opd": {"teacher": {"path": "Qwen/Qwen2-7B"}},
        "actor_rollout_ref": {
            "model": {"path": "Qwen/Qwen2-0.5B"},
            "actor": {"ppo_max_token_len_per_gpu": 1000, "fsdp_config": {"optimizer_offload": True}},
            "ref": {"fsdp_config": {"model_dtype": "bf16"}},
            "rollout": {"gpu_memory_utilization": 0.5, "tensor_model_parallel_size": 1},
        },
        "trainer": {"nnodes": 2, "n_gpus_per_node": 4},
    }
    e = he.estimate(recipe)
    assert e["ranks"] == 8
    assert e["gpu_actor"] * gib == pytest.approx(ps * (4 + 4) / 8)  # fp32 weights + fp32 grads; Adam on host
    assert e["host_actor"] * gib == pytest.approx(ps * 8 * 4 / 8)  # this node's 4 ranks' Adam shards
    assert e["host_teacher"] * gib == pytest.approx(pt * 2 / 2)  # bf16, half of the teacher on each node
    logits = 1000 * shape.vocab * 6 + 1000 * shape.hidden * shape.layers * 2
    assert e["gpu_train_microbatch"] * gib == pytest.approx(logits + 1000 * (4 * 896 + 3 * 4864) * 2)
    assert e["gpu_needed"] == pytest.approx(max(e["gpu_actor"] / 0.5, e["gpu_actor"] + e["gpu_train_microbatch"],
                                                e["gpu_actor"] + e["gpu_teacher_pass"]))

    lora = {**recipe, "trainer": {"nnodes": 1, "n_gpus_per_node": 8}}
    lora["actor_rollout_ref"] = {**recipe["actor_rollout_ref"], "model": {"path": "Qwen/Qwen2-0.5B", "lora_rank": 16},
                                 "actor": {"ppo_max_token_len_per_gpu": 1000}}
    e = he.estimate(lora)
    pl = he.lora_param_count(shape, 16)
    assert e["trainable_params"] == pl
    assert e["gpu_actor"] * gib == pytest.approx((ps * 4 + pl * 4 + pl * 4 + pl * 8) / 8)
    assert e["host_vllm"] * gib == pytest.approx(ps * 2 * 8)  # sleep level 1: one bf16 copy per TP=1 group


def test_every_gpu_recipe_has_an_estimate():
    recipes = he.gpu_recipes()
    assert len(recipes) >= 8
    table = he.table()
    for name in recipes:
        assert f"`{name}`" in table
        assert he.estimate(recipes[name])["gpu_needed"] > 0
