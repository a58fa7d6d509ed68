"""A causal LM's output head applied to its final hidden state (pure torch, no verl import): what the model does
after the last hidden state (the input of lm_head, the final norm already applied), per architecture.

The teacher pool's loss-level support=full sends the teachers' final hidden states; the student's process rebuilds
their logits with this head. Only architectures whose logits are lm_head(hidden), then one of the known scalings,
are reproduced; any other (an unknown model_type) is refused with the reason, since a missing step would change
the teacher's distribution silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

PLAIN = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "deepseek_v3")
SOFTCAPPED = ("gemma2", "gemma3_text")  # logits = cap * tanh(logits / cap), cap = final_logit_softcapping
SCALED = ("cohere", "cohere2")  # logits * logit_scale
DIVIDED = ("granite", "granitemoe")  # logits / logits_scaling
KNOWN = PLAIN + SOFTCAPPED + SCALED + DIVIDED


@dataclass(frozen=True)
class HeadOps:
    """What follows lm_head(hidden): a multiplier or a divisor (as the model writes it), then a tanh soft-cap."""

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None


def head_ops(config: Mapping) -> HeadOps:
    """The head's operations after lm_head from a model's config.json (a dict); ValueError naming the
    model_type when the architecture is not one whose head is reproduced here."""
    model_type = config.get("model_type")
    if model_type not in KNOWN:
        raise ValueError(f"model_type {model_type!r} is not one whose output head (what it applies after the last "
                         f"hidden state) is known here (known: {', '.join(KNOWN)})")
    if model_type in SOFTCAPPED:
        cap = config.get("final_logit_softcapping")
        return HeadOps(softcap=None if cap is None else float(cap))
    if model_type in SCALED:
        return HeadOps(multiply=float(config.get("logit_scale", 1.0)))
    if model_type in DIVIDED:
        return HeadOps(divide=float(config.get("logits_scaling", 1.0)))
    return HeadOps()


def head_logits(hidden: Tensor, weight: Tensor, ops: HeadOps, bias: Tensor | None = None) -> Tensor:
    """Logits [n, V] of final hidden states [n, H], in the hidden states' dtype (as the model's lm_head computes
    them at that precision; the weight is cast to it)."""
    logits = torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    if ops.multiply is not None:
        logits = logits * ops.multiply
    if ops.divide is not None:
        logits = logits / ops.divide
    if ops.softcap is not None:
        logits = torch.tanh(logits / ops.softcap) * ops.softcap
    return logits
