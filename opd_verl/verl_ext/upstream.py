"""The verl code this plugin mirrors, pinned by the sha256 of its upstream source (verl 0.9.1).

A mirrored function is our copy of verl's logic with a change (e.g. our trainer's `_compute_advantage` is verl's
with the teacher's and the student's log-probs passed on). When verl changes the original, the copy is stale:
tests/test_upstream_pins.py recomputes each hash from the installed verl and fails, naming the copy to revisit.
The verl/vLLM patches (opd_verl.patches, opd_verl.cpu.patches) pin their targets the same way, with these functions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util

VERL_VERSION = "0.9.1"

#: our copy -> (verl's "module:qualname", sha256 of its source in verl 0.9.1)
MIRRORS = {
    "opd_verl.verl_ext.trainer:OPDTrainer._compute_advantage": (
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_advantage",
        "88d9c72a30f7f49cf24768d0dc507078f949303e6749d8aac0bf4d052fd156e2"),
    "opd_verl.verl_ext.teacher_worker:OPDWorker._build_teacher": (
        "verl.workers.engine_workers:ActorRolloutRefWorker.init_model",
        "c77a321e3a391620d62b39a366a0933b8227fb3a3f6a9bf7d69fa18e15b3b8ff"),
    "opd_verl.verl_ext.task_runner:OPDTaskRunner.run": (
        "verl.trainer.main_ppo:TaskRunnerV1.run", "661a86160739a0dcc1014f71164b707641d7a59b6edc05b4c69a39cb56758fc0"),
    "opd_verl.verl_ext.distill_actor_loss:packed_logits": (
        "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.prepare_model_outputs",
        "06c245b398a0a84f51e9c78943d6000d9b9a102ba1360206a31f423a1999ea41"),
    # verl's decorators (register, DistProfiler.annotate, _with_routing_replay_flag) are part of the pinned source
    "opd_verl.verl_ext.teacher_worker:OPDWorker.compute_ref_log_prob": (
        "verl.workers.engine_workers:ActorRolloutRefWorker.compute_ref_log_prob",
        "cacc385584fe9ccdcd6377f73e243c46bf50ca6e6f13f54c52c6455d3fde43d0"),
    "opd_verl.verl_ext.teacher_worker:OPDWorker.update_actor": (
        "verl.workers.engine_workers:ActorRolloutRefWorker.update_actor",
        "b1e5116ae95cea37a6e1721e43c136dbf0be07df5942b2083727e04e248e00e2"),
    # the mean_logit reference pass rides verl's `distillation_use_topk` logits-processor hook: infer_batch hands
    # the loss_fn (compute_loss) to the engine, whose prepare_model_outputs calls it with the packed logits
    "opd_verl.verl_ext.teacher_worker:OPDWorker._mean_logit_ref_log_prob": (
        "verl.workers.engine_workers:TrainingWorker.infer_batch",
        "41993faddd1d61776c983606fb455c626dddd218a69c35bd3a351c6c0c06792f"),
    "opd_verl.verl_ext.teacher_worker:OPDWorker._mean_logit_processor": (
        "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.prepare_model_outputs",
        "06c245b398a0a84f51e9c78943d6000d9b9a102ba1360206a31f423a1999ea41"),
    # the teachers on their own pool: the two offload names the FSDP wrap reads, swapped while they are built
    "opd_verl.verl_ext.teacher_pool:resident_build": (
        "verl.workers.engine.fsdp.transformer_impl:FSDPEngine._build_fsdp_module",
        "6855699967a0ec5e9996f42f240405f7fa19ac04ee3d15b9af5367d21f0994f1"),
    "opd_verl.verl_ext.teacher_pool:build_teacher_group": (
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._setup",
        "8c11041b68030740f51455c842ec911fd3141ca3f197e95dfe909c6e1e97990a"),
    "opd_verl.verl_ext.teacher_worker:OPDWorker._teacher_forward": (
        "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.forward_step",
        "dc1a472be40ea7b8e6da4be553dfb3881e15d60dc5e098c809dfe6ea7725643b"),
    # a served teacher (opd.teacher.engine=vllm): what verl's teacher pool asks the server for, the layout it returns
    # (q_t is read from it), where it lands in the batch, the reference pass it replaces, the worker taking its loss
    "opd_verl.verl_ext.served_teacher:distillation_settings": (
        "verl.experimental.teacher_loop.teacher_manager:_get_teacher_sampling_params",
        "d7857c19a55d8eccfee618954fa6dcee5ec95bb1923a0d32b692f36da2bd52f1"),
    "opd_verl.verl_ext.served_teacher:sampled_token_log_probs": (
        "verl.workers.rollout.vllm_rollout.utils:extract_prompt_logprobs",
        "230548fbcddfd45f616732df5c5cce5a25f183932144d5695a9c51bf5f601431"),
    "opd_verl.verl_ext.served_teacher:served_ref_log_prob": (
        "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._compute_teacher_logprobs",
        "de7f318665e2025dd94aefdfccf6357153cdb212e5a4d26ae420c163f06e52c7"),
    "opd_verl.verl_ext.trainer:OPDTrainer._compute_ref_log_prob": (
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_ref_log_prob",
        "78f6630e855fbcd8ea6d7c5a1c6f02e34a5e3181c289c68224737f5730b0cadb"),
    "opd_verl.verl_ext.served_teacher:served_worker_class": (
        "verl.workers.engine_workers:ActorRolloutRefWorker.__init__",
        "8b4bd0ea4b16f47387140766d340035ce45540596b920d1bc92b1b8884cfe847"),
}


def upstream_source(target: str) -> str:
    """Source text of "module:qualname" read from the installed file (not the live, possibly patched object)."""
    module_name, qualname = target.split(":")
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(module_name)
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read()
    node = ast.parse(text)
    for part in qualname.split("."):
        body = node.body
        matches = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part]
        if not matches:
            raise LookupError(f"{qualname} not found in {spec.origin}")
        node = matches[-1]
    segment = ast.get_source_segment(text, node, padded=False)
    decorators = "".join(ast.get_source_segment(text, d) + "\n" for d in getattr(node, "decorator_list", []))
    return decorators + segment


def upstream_sha(target: str) -> str:
    return hashlib.sha256(upstream_source(target).encode()).hexdigest()
