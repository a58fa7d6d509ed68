"""The teacher in the reference role of verl's actor/rollout/ref worker (verl extension point: the worker class).

Targets verl 0.9.1 `verl/workers/engine_workers.py::ActorRolloutRefWorker`. verl builds the reference from a
deep copy of the actor's model config; this subclass builds it from the teacher's instead, colocated in the same
worker group (no separate pool). Overridden worker methods carry verl's `@register` markers again (without them
the worker group has no such method).
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy
from functools import partial

import torch
from omegaconf import open_dict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig, TrainingWorkerConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from opd_verl.algorithms.teachers import mix_log_probs, mix_teacher_logits, route_rows
from opd_verl.checks.options import DISTILL_LOSS_MODES, route_table, route_teacher_indices
from opd_verl.plugin import require_plugin_loaded


def teacher_model_config(model_config, teacher: dict):
    """The student's model config (OmegaConf) with the teacher's path and no LoRA: the teacher is frozen."""
    cfg = deepcopy(model_config)
    with open_dict(cfg):
        cfg.path = teacher["path"]
        cfg.tokenizer_path = teacher.get("tokenizer_path") or teacher["path"]
        cfg.lora_rank = 0
        cfg.lora = {}
        cfg.lora_adapter_path = None
        cfg.local_path = None
        cfg.hf_config_path = None
        cfg.local_hf_config_path = None
        cfg.local_tokenizer_path = None
    model = omega_conf_to_dataclass(cfg)
    model.mtp = dataclasses.replace(model.mtp, enable=False)
    return model


class OPDWorker(ActorRolloutRefWorker):
    """ActorRolloutRefWorker whose reference is the teacher (or several), and whose actor loss may distil."""

    opd_options: dict = {}  # the composed `opd:` section, set by make_worker_class
    teacher_entries: list = []

    def _rename_ref_batch_keys(self) -> None:
        with open_dict(self.config.ref):
            self.config.ref.ppo_mini_batch_size = self.config.actor.ppo_mini_batch_size
            self.config.ref.ppo_micro_batch_size = self.config.ref.pop("log_prob_micro_batch_size", None)
            self.config.ref.ppo_micro_batch_size_per_gpu = self.config.ref.pop("log_prob_micro_batch_size_per_gpu", None)
            self.config.ref.use_dynamic_bsz = self.config.ref.pop("log_prob_use_dynamic_bsz", False)
            self.config.ref.ppo_max_token_len_per_gpu = self.config.ref.pop("log_prob_max_token_len_per_gpu", None)

    def _build_teacher(self, teacher: dict) -> TrainingWorker:
        # Mirrors the reference block of ActorRolloutRefWorker.init_model (verl 0.9.1) with the teacher's model.
        # The renaming of the log_prob_* keys is done once (it pops them), then shared by every teacher.
        if not getattr(self, "_ref_keys_renamed", False):
            self._rename_ref_batch_keys()
            self._ref_keys_renamed = True
        ref_config: ActorConfig = omega_conf_to_dataclass(self.config.ref)
        ref_config.model_config = teacher_model_config(self.config.model, teacher)
        if self.opd_options.get("teacher", {}).get("param_offload"):
            ref_config.engine.param_offload = True
        training_config = TrainingWorkerConfig(
            model_type=ref_config.model_config.get("model_type", "language_model"),
            model_config=ref_config.model_config,
            engine_config=ref_config.engine,
            optimizer_config=ref_config.optim,
            checkpoint_config=ref_config.checkpoint,
            profiler_config=None,
        )
        training_config.engine_config.use_dynamic_bsz = self.config.ref.use_dynamic_bsz
        training_config.engine_config.infer_max_token_len_per_gpu = self.config.ref.ppo_max_token_len_per_gpu
        training_config.engine_config.infer_micro_batch_size_per_gpu = self.config.ref.ppo_micro_batch_size_per_gpu
        training_config.engine_config.use_remove_padding = self.config.model.get("use_remove_padding", False)
        worker = self.ref_worker_cls(config=training_config)
        worker.reset()
        return worker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        require_plugin_loaded()
        role = self.role
        builds_teacher = "ref" in role
        # verl builds no reference when "ref" is not in the role: the teacher takes its place below.
        self.role = role.replace("_ref", "") if role != "ref" else "teacher"
        try:
            super().init_model()
        finally:
            self.role = role
        if builds_teacher:
            self.teachers = [self._build_teacher(entry) for entry in self.teacher_entries]
            self.ref = self.teachers[0]
            self.set_dispatch_collect(mesh_name="ref", **self.ref.get_dispatch_collect())
        if "actor" in role and self._uses_distill_loss():
            from opd_verl.verl_ext.distill_actor_loss import opd_actor_loss

            actor_config = self.loss_fn.keywords["config"]
            self.loss_fn = partial(
                opd_actor_loss, config=actor_config, opd=self.opd_options, teacher_logits_fn=self.teacher_logits
            )
            self.actor.set_loss_fn(self.loss_fn)

    def _uses_distill_loss(self) -> bool:
        return self.config.actor.policy_loss.get("loss_mode") in DISTILL_LOSS_MODES

    def _sample_teachers(self, data) -> torch.Tensor | None:
        """Each sample's teacher index under multi_teacher_mode=route (None when teachers are averaged)."""
        if self.opd_options.get("multi_teacher_mode") != "route" or len(self.teachers) < 2:
            return None
        sources = tu.get(data, "data_source")
        if sources is None:
            raise RuntimeError("opd_verl: multi_teacher_mode=route needs each sample's data_source in the batch; "
                               "the dataset has no data_source column")
        return torch.tensor(route_teacher_indices(sources, route_table(self.teacher_entries)))

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="ref"))
    def compute_ref_log_prob(self, data):
        """The teachers' log-probs of the sampled tokens: one teacher, the weighted mean of the teachers'
        probabilities, or (route) each sample's own teacher. With several teachers every teacher scores the whole
        batch, so the FSDP collectives stay in step across data-parallel ranks."""
        if len(self.teachers) == 1:
            output = self.ref.infer_batch(data=data)
            return output.cpu() if output is not None else None
        sample_teacher = self._sample_teachers(data)
        outputs = [teacher.infer_batch(data=data) for teacher in self.teachers]
        if outputs[0] is None:
            return None
        first = outputs[0]["log_probs"]
        per_teacher = [out["log_probs"].values() for out in outputs]
        if sample_teacher is not None:
            combined = route_rows(per_teacher, sample_teacher, first.offsets().diff())
        else:
            combined = mix_log_probs(per_teacher, [t["weight"] for t in self.teacher_entries])
        outputs[0]["log_probs"] = torch.nested.nested_tensor_from_jagged(combined, first.offsets())
        return outputs[0].cpu()

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        if self._uses_distill_loss() and self.opd_options["support"] in ("topk", "full"):
            # verl calls the loss as a logits processor (with the student's logits) only under this flag.
            tu.assign_non_tensor(data, distillation_use_topk=True)
        output = self.actor.train_mini_batch(data=data)
        return output.cpu() if output is not None else None

    def teacher_logits(self, micro_batch) -> torch.Tensor:
        """Teacher logits [nnz, V] at the same packed positions as the student's logits of this micro-batch."""
        from opd_verl.verl_ext.distill_actor_loss import packed_logits

        logits = []
        for teacher in self.teachers:
            engine = teacher.engine
            model_inputs, output_args = engine.prepare_model_inputs(micro_batch=micro_batch)
            with torch.no_grad():
                output = engine.module(**model_inputs, use_cache=False)
            logits.append(packed_logits(output.logits, micro_batch, output_args))
        sample_teacher = self._sample_teachers(micro_batch)
        if sample_teacher is not None:
            combined = route_rows(logits, sample_teacher, micro_batch["input_ids"].offsets().diff())
        else:
            weights = [t["weight"] for t in self.teacher_entries]
            combined = mix_teacher_logits(logits, weights, self.opd_options["multi_teacher_mode"])
        if not getattr(self, "_alignment_checked", False) and self.opd_options["multi_teacher_mode"] != "mean_logit":
            from opd_verl.verl_ext.distill_actor_loss import check_alignment

            check_alignment(combined, output_args["input_ids_rmpad_rolled"], micro_batch)
            self._alignment_checked = True
        return combined


def make_worker_class(opd_options: dict, teacher_entries: list[dict]) -> type[OPDWorker]:
    """An OPDWorker subclass carrying the run's options (Ray pickles the class into each worker)."""
    return type("OPDWorker", (OPDWorker,), {"opd_options": opd_options, "teacher_entries": teacher_entries})
