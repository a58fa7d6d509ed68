"""A teacher's output head in the student's process (opd.teacher_pool with the loss-level support=full): its
lm_head weight (the input embedding when the checkpoint ties them) read from the checkpoint's safetensors alone,
never the whole model, and the scaling / soft-capping its architecture applies (opd_verl.algorithms.output_head).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from opd_verl.algorithms.output_head import HeadOps, head_logits, head_ops


@dataclass
class TeacherHead:
    weight: torch.Tensor  # [V, H], the checkpoint's dtype
    bias: torch.Tensor | None
    ops: HeadOps

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [n, V] of its final hidden states [n, H] in their dtype (the teacher's compute
        dtype, as the pool sent them), not under the caller's (the actor's) autocast; the weight moves to their
        device once."""
        if self.weight.device != hidden.device:
            self.weight = self.weight.to(hidden.device)
            self.bias = None if self.bias is None else self.bias.to(hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return head_logits(hidden, self.weight, self.ops, self.bias)


def _head_names(config) -> tuple[str, str]:
    """The checkpoint names of the output embedding's and the input embedding's weights (a meta-device model,
    no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(model.get_output_embeddings())], names[id(model.get_input_embeddings())]


def _tensor_files(path: str) -> dict[str, str]:
    """{tensor name: safetensors file} of a local checkpoint directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"opd_verl: {path} has no safetensors checkpoint (model.safetensors or its index); "
                                "the teacher pool's support=full reads the teacher's lm_head from it")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _read(files: dict[str, str], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(files[name], "pt") as f:
        return f.get_tensor(name)


def load_teacher_head(path: str, trust_remote_code: bool = False) -> TeacherHead:
    """The output head of the teacher checkpoint at ``path`` (local, or a hub name in the local cache)."""
    from transformers import AutoConfig
    from verl.utils.fs import copy_to_local

    local = copy_to_local(path)
    config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    ops = head_ops(config.to_dict())
    out_name, in_name = _head_names(config)
    files = _tensor_files(local)
    weight_name = f"{out_name}.weight" if f"{out_name}.weight" in files else f"{in_name}.weight"  # tied
    if weight_name not in files:
        raise KeyError(f"opd_verl: teacher {path}: no {out_name}.weight (nor a tied {in_name}.weight) in its checkpoint")
    bias_name = f"{out_name}.bias"
    bias = _read(files, bias_name) if bias_name in files else None
    return TeacherHead(_read(files, weight_name), bias, ops)
