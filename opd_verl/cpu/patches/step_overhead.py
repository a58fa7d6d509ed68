"""Patches that cut verl 0.9.1's per-step overhead on CPU (found by profiling a demo step with py-spy; bench/README
"Where a CPU step goes"). Each leaves the results unchanged and acts only on the CPU platform (or on CPU tensors).

    agent_loop_reuse_single_turn   verl/experimental/agent_loop/agent_loop.py: AgentLoopWorker._run_agent_loop
    logprobs_chunked_logsumexp     verl/utils/torch_functional.py: logprobs_from_logits_v2
    micro_batch_on_cpu_no_copy     verl/workers/engine/fsdp/transformer_impl.py: FSDPEngineWithLMHead.forward_step
"""

from __future__ import annotations

import torch

from opd_verl.patches import _register, _wrap_once

from . import _on_cpu_platform


# --- verl 0.9.1: `AgentLoopWorker._run_agent_loop` builds a new agent loop with `hydra.utils.instantiate` for every
# sample (an OmegaConf merge and a tokenizer-bound Continuous Token builder each time): 17% of the agent-loop worker's
# CPU in a demo step, the process that bounds `gen` on CPU. The single-turn loop keeps no per-sample state (its
# `run` reads only what __init__ set; the text Continuous Token builders set their fields in __init__ only), so on
# CPU one instance per worker and agent is built once and reused. Any other agent loop, and a multimodal processor,
# keep verl's per-sample instance.
def _reusable_agent_loop(worker, agent_name: str, build):
    """The worker's cached single-turn text agent loop for `agent_name` (built by `build()` once), or `build()`."""
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    cache = worker.__dict__.setdefault("_opd_verl_agent_loops", {})
    if agent_name in cache:
        return cache[agent_name]
    agent_loop = build()
    if type(agent_loop) is SingleTurnAgentLoop and worker.processor is None:
        cache[agent_name] = agent_loop
    return agent_loop


@_register(
    "agent_loop_reuse_single_turn",
    "verl.experimental.agent_loop.agent_loop",
    "verl",
    "0.9.1",
    "a new agent loop is hydra-instantiated per sample (17% of the agent-loop worker's CPU in a demo step)",
    {
        "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._run_agent_loop": "b374079bf2f017472626797a5e1f27928d1ce61c62fbbbb89162ce26134ee021",
        "verl.experimental.agent_loop.agent_loop:AgentLoopBase.__init__": "90e1947e62b855d865fc96c6e1d4320608ebb9531e65cd8194197523b83e5535",
        "verl.experimental.agent_loop.single_turn_agent_loop:SingleTurnAgentLoop": "56ed1d71a3f47493ea570c9ca6994999e56f234742bf38ea46ea376fe7f8e1e0",
    },
)
def _patch_agent_loop_reuse(module) -> None:
    # mirrors verl 0.9.1 AgentLoopWorker._run_agent_loop (pinned above); the change: the instance comes from
    # _reusable_agent_loop. Off the CPU platform verl's own method runs.
    def make(original):
        async def _run_agent_loop(self, sampling_params, trajectory, *, agent_name, trace=True, **kwargs):
            if not _on_cpu_platform():
                return await original(self, sampling_params, trajectory, agent_name=agent_name, trace=trace, **kwargs)
            with module.rollout_trace_attr(
                step=trajectory["step"],
                sample_index=trajectory["sample_index"],
                rollout_n=trajectory["rollout_n"],
                validate=trajectory["validate"],
                name="agent_loop",
                trace=trace,
            ):
                assert agent_name in module._agent_loop_registry, (
                    f"Agent loop {agent_name} not registered, registered agent loops: "
                    f"{module._agent_loop_registry.keys()}"
                )
                agent_loop_config = module._agent_loop_registry[agent_name]
                agent_loop = _reusable_agent_loop(self, agent_name, lambda: module.hydra.utils.instantiate(
                    config=agent_loop_config,
                    trainer_config=module.DictConfigWrap(config=self.config),
                    server_manager=self.llm_client,
                    tokenizer=self.tokenizer,
                    processor=self.processor,
                    hf_model_type=self.hf_model_type,
                    dataset_cls=self.dataset_cls,
                    data_config=module.DictConfigWrap(self.config.data),
                    tools=module.ToolListWrap(self.tools),
                ))
                output = await agent_loop.run(sampling_params, **kwargs)
                return await self._agent_loop_postprocess(output, trajectory["validate"], **kwargs)

        return _run_agent_loop

    _wrap_once(module.AgentLoopWorker, "_run_agent_loop", make)


# --- verl 0.9.1: without flash-attn's cross entropy (every CPU run), `logprobs_from_logits` takes
# `logprobs_from_logits_v2`, which for fp32/fp64 logits calls torch.logsumexp once per row, in a Python loop, to bound
# the peak memory: one call (and one autograd node) per token of the micro-batch, 10% of the actor/teacher worker's
# CPU in a demo step. On CPU tensors the rows are taken in chunks of up to LOGSUMEXP_CHUNK_ELEMENTS logits instead:
# the same values and gradients (each row's reduction is the same), the peak still bounded, by the chunk.
LOGSUMEXP_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 logits per logsumexp call


def chunked_logsumexp(logits: torch.Tensor, max_elements: int = LOGSUMEXP_CHUNK_ELEMENTS) -> torch.Tensor:
    """torch.logsumexp(logits, -1) over chunks of leading rows of at most `max_elements` elements each (at least one
    row per chunk); logits [N, ..., V] -> [N, ...]."""
    if logits.dim() == 1 or logits.numel() <= max_elements:
        return torch.logsumexp(logits, dim=-1)
    rows = max(1, max_elements // logits[0].numel())
    return torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in logits.split(rows)])


@_register(
    "logprobs_chunked_logsumexp",
    "verl.utils.torch_functional",
    "verl",
    "0.9.1",
    "logprobs_from_logits_v2 calls logsumexp once per row in Python for fp32 logits (10% of a worker's CPU on CPU)",
    {
        "verl.utils.torch_functional:logprobs_from_logits_v2": "e2abcaee01a294f1a212a6dd190d065afb514ca7abacf61ba226946329cb7822",
        "verl.utils.torch_functional:logprobs_from_logits": "c263cabac8e5350391adf9b818e5e53158c2b2ed2c2ab7b6dfbe168a5c64c2a1",
    },
)
def _patch_logprobs_chunked(module) -> None:
    def make(original):
        def logprobs_from_logits_v2(logits: torch.FloatTensor, labels):
            if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64):
                return original(logits, labels)
            logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
            return logits_labels - chunked_logsumexp(logits)

        return logprobs_from_logits_v2

    _wrap_once(module, "logprobs_from_logits_v2", make)


# --- verl 0.9.1: `FSDPEngineWithLMHead.forward_step` starts with `micro_batch.to(get_device_id())`. A micro-batch read
# from TransferQueue has no device, so on CPU the call rebuilds it, every per-sample non-tensor entry (prompts, data
# sources, extra info: one NonTensorData per sample and field) included: 17% of the actor/teacher worker's CPU in a
# demo step, to move nothing. On the CPU platform every tensor is on the CPU already: the micro-batch (a fresh chunk
# of the batch) is marked as being there, and tensordict's `to` returns it as it is (its `device == self.device`
# shortcut, pinned below).
def mark_on_cpu(micro_batch) -> None:
    """Set the device of a device-less TensorDict whose tensors are all on the CPU to "cpu", without a copy."""
    if micro_batch.device is None:
        object.__setattr__(micro_batch, "_device", torch.device("cpu"))


@_register(
    "micro_batch_on_cpu_no_copy",
    "verl.workers.engine.fsdp.transformer_impl",
    "verl",
    "0.9.1",
    "forward_step rebuilds every micro-batch (all its per-sample non-tensor entries) to move it to the device it is on",
    {
        "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.forward_step": "dc1a472be40ea7b8e6da4be553dfb3881e15d60dc5e098c809dfe6ea7725643b",
        "tensordict.base:TensorDictBase.to": "bc56f233fed46553c3087b68290986ab4dd14d89f42099ed46706ea3b4233518",
    },
)
def _patch_micro_batch_on_cpu(module) -> None:
    def make(original):
        def forward_step(self, micro_batch, loss_function, forward_only):
            if _on_cpu_platform():
                mark_on_cpu(micro_batch)
            return original(self, micro_batch, loss_function, forward_only)

        return forward_step

    _wrap_once(module.FSDPEngineWithLMHead, "forward_step", make)
