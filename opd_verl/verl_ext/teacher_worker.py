"""The teacher in the reference role of verl's actor/rollout/ref worker (verl extension point: the worker class).

Targets verl 0.9.1 `verl/workers/engine_workers.py::ActorRolloutRefWorker`. verl builds the reference from a
deep copy of the actor's model config; this subclass builds it from the teacher's own (teacher_model_config) instead,
colocated in the same worker group (no separate pool). Overridden worker methods carry verl's decorators again, in
verl's order: `@register` (without it the worker group has no such method), the profiler's `DistProfiler.annotate`
and the MoE router-replay flag `_with_routing_replay_flag`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from importlib import resources

import torch
from omegaconf import OmegaConf, open_dict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.profiler import DistProfiler
from verl.workers.config import ActorConfig, HFModelConfig, TrainingWorkerConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker, _with_routing_replay_flag

from opd_verl.algorithms.teachers import mean_logit_label_log_probs, mix_log_probs, route_rows
from opd_verl.checks.modes import DISTILL_LOSS_MODES
from opd_verl.checks.routing import route_table, route_teacher_indices
from opd_verl.plugin import require_plugin_loaded
from opd_verl.verl_ext.teacher_pool import offloads_params, resident_build


def teacher_model_config(model_config, teacher: dict) -> HFModelConfig:
    """The teacher's HFModelConfig: verl's defaults (the hf_model section verl composes the student's from), what
    the teacher shares with the student (`model_config`, OmegaConf), then the teacher's own `model:` options.

    Shared: use_remove_padding (the reference pass and the loss-level pass feed the teacher the student's packed
    layout), and override_config.attn_implementation unless the teacher sets it (the attention must handle that
    layout; the CPU defaults set opd_cpu_varlen on the student). Nothing else of the student's carries over (its
    override_config, use_liger, use_fused_kernels, custom_chat_template, trust_remote_code, LoRA, MTP, ...)."""
    defaults = OmegaConf.load(resources.files("verl.trainer.config").joinpath("model/hf_model.yaml"))
    shared = {"use_remove_padding": model_config.get("use_remove_padding", True)}
    attn = OmegaConf.select(model_config, "override_config.attn_implementation", default=None)
    if attn is not None:
        shared["override_config"] = {"attn_implementation": attn}
    own = {"path": teacher["path"], "tokenizer_path": teacher.get("tokenizer_path") or teacher["path"]}
    return omega_conf_to_dataclass(OmegaConf.merge(defaults, shared, own, teacher.get("model") or {}))


def ref_profiler_config(ref_section):
    """The reference role's profiler config (`actor_rollout_ref.ref.profiler`) as verl 0.9.1's init_model builds it
    for its reference worker, so the teacher is profiled where verl's reference would be."""
    section = ref_section.get("profiler", {})
    return omega_conf_to_dataclass(section) if section else None


class OPDWorker(ActorRolloutRefWorker):
    """ActorRolloutRefWorker whose reference is the teacher (or several), and whose actor loss may distil."""

    opd_options: dict = {}  # the composed `opd:` section, set by make_worker_class
    teacher_entries: list = []
    resident: bool = False  # the teachers on a pool of their own (opd.teacher_pool): built without CPU offload

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
        training_config = TrainingWorkerConfig(
            model_type=ref_config.model_config.get("model_type", "language_model"),
            model_config=ref_config.model_config,
            engine_config=ref_config.engine,
            optimizer_config=ref_config.optim,
            checkpoint_config=ref_config.checkpoint,
            profiler_config=ref_profiler_config(self.config.ref),
        )
        training_config.engine_config.use_dynamic_bsz = self.config.ref.use_dynamic_bsz
        training_config.engine_config.infer_max_token_len_per_gpu = self.config.ref.ppo_max_token_len_per_gpu
        training_config.engine_config.infer_micro_batch_size_per_gpu = self.config.ref.ppo_micro_batch_size_per_gpu
        training_config.engine_config.use_remove_padding = self.config.model.get("use_remove_padding", False)
        with resident_build() if self.resident else nullcontext():  # a pool of its own: no CPU offload
            worker = self.ref_worker_cls(config=training_config)
            worker.reset()
        if self.resident:
            offloaded = offloads_params(worker.engine.module)
            print(f"opd_verl: teacher {teacher['path']} on its own pool: parameters "
                  f"{'offloaded to CPU' if offloaded else 'resident'}")
        worker.opd_view = self._teacher_view(teacher, ref_config.model_config.tokenizer)
        return worker

    def _teacher_view(self, teacher: dict, tokenizer):
        """The teacher's TeacherView, or None when it reads the student's ids (opd.teacher.prompt=student)."""
        from opd_verl.checks.teachers import has_view
        from opd_verl.verl_ext.teacher_batch import TeacherView

        if not has_view(teacher):
            return None
        return TeacherView(teacher["prompt"], bool(teacher["wrap_chat"]), bool(teacher["cross_tokenizer"]), tokenizer)

    def _student_tokenizer(self):
        """The student's tokenizer (its response bytes, for a cross-tokenizer teacher); loaded once."""
        if getattr(self, "_opd_student_tokenizer", None) is None:
            from verl.utils import hf_tokenizer
            from verl.utils.fs import copy_to_local

            model = self.config.model
            path = copy_to_local(model.get("tokenizer_path") or model.path, use_shm=model.get("use_shm", False))
            self._opd_student_tokenizer = hf_tokenizer(path, trust_remote_code=model.get("trust_remote_code", False))
        return self._opd_student_tokenizer

    def _teacher_infer(self, index: int, data):
        """Teacher ``index``'s reference pass: verl's infer_batch on the student's batch (no view: exactly today's
        call), else on the teacher's own batch with its log-probs mapped back (opd_verl.verl_ext.teacher_batch)."""
        teacher = self.teachers[index]
        view = getattr(teacher, "opd_view", None)
        if view is None:
            return teacher.infer_batch(data=data)
        from opd_verl.verl_ext.teacher_batch import infer_with_view

        student_tok = self._student_tokenizer() if view.cross_tokenizer else None
        return infer_with_view(teacher, view, data, student_tok, index)

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
            teacher_fn = self.pool_teacher_pass if self.resident else self.teacher_logits
            self.loss_fn = partial(opd_actor_loss, config=actor_config, opd=self.opd_options, teacher_logits_fn=teacher_fn)
            self.actor.set_loss_fn(self.loss_fn)

    def _uses_distill_loss(self) -> bool:
        return self.config.actor.policy_loss.get("loss_mode") in DISTILL_LOSS_MODES

    def _sample_teachers(self, data) -> torch.Tensor | None:
        """Each sample's teacher index under multi_teacher_mode=route (None when teachers are averaged)."""
        if self.opd_options.get("multi_teacher_mode") != "route" or len(self.teacher_entries) < 2:
            return None
        sources = tu.get(data, "data_source")
        if sources is None:
            raise RuntimeError("opd_verl: multi_teacher_mode=route needs each sample's data_source in the batch; "
                               "the dataset has no data_source column")
        return torch.tensor(route_teacher_indices(sources, route_table(self.teacher_entries)))

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="ref"))
    @DistProfiler.annotate(color="olive", role="ref_compute_log_prob")
    @_with_routing_replay_flag(enabled=False)
    def compute_ref_log_prob(self, data):
        """The teachers' log-probs of the sampled tokens (at the rollout temperature, as verl's reference pass):
        one teacher, the weighted mean of the teachers' probabilities (mean_prob), the token under the mean of
        their logits (mean_logit: the same mixture the loss-level pass distils from), or (route) each sample's own
        teacher. With several teachers every teacher scores the whole batch, so the FSDP collectives stay in step
        across data-parallel ranks. On a teacher pool with the loss-level support=topk, the output also carries
        the loss's payload (opd_verl.verl_ext.pool_payload; support=topk|full)."""
        output = self._reference_pass(data)
        if output is not None and self._sends_payload():
            output.update(self._pool_payload(data))
        return output.cpu() if output is not None else None

    def _reference_pass(self, data):
        if len(self.teachers) == 1:
            return self._teacher_infer(0, data)
        if self.opd_options.get("multi_teacher_mode") == "mean_logit":
            return self._mean_logit_ref_log_prob(data)
        sample_teacher = self._sample_teachers(data)
        outputs = [self._teacher_infer(i, data) for i in range(len(self.teachers))]
        if outputs[0] is None:
            return None
        first = outputs[0]["log_probs"]
        per_teacher = [out["log_probs"].values() for out in outputs]
        if sample_teacher is not None:
            combined = route_rows(per_teacher, sample_teacher, first.offsets().diff())
        else:
            combined = mix_log_probs(per_teacher, [t["weight"] for t in self.teacher_entries])
        outputs[0]["log_probs"] = torch.nested.nested_tensor_from_jagged(combined, first.offsets())
        from opd_verl.verl_ext.teacher_batch import ALIGNMENT_FIELD

        for i, out in enumerate(outputs[1:], 1):  # the other teachers' alignment counts (cross_tokenizer), if any
            if ALIGNMENT_FIELD.format(index=i) in out.keys():
                outputs[0][ALIGNMENT_FIELD.format(index=i)] = out[ALIGNMENT_FIELD.format(index=i)]
        return outputs[0]

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    @DistProfiler.annotate(color="red", role="actor_update", scheduled=True)
    @_with_routing_replay_flag(enabled=True)
    def update_actor(self, data):
        if self._uses_distill_loss():
            tu.assign_non_tensor(data, **update_actor_flags(self.opd_options))
        output = self.actor.train_mini_batch(data=data)
        return output.cpu() if output is not None else None

    @staticmethod
    def _teacher_forward(teacher, micro_batch, hidden: list | None = None):
        """One teacher's raw packed logits [nnz, V] of a micro-batch (no temperature) and the engine's output_args.
        Runs at the teacher engine's own precision (its autocast dtype, as its reference pass in verl's
        FSDPEngineWithLMHead.forward_step), not under the caller's (the actor's) autocast. ``hidden`` (a list):
        its final hidden states [nnz, H] (`_final_hidden`) are appended to it."""
        from opd_verl.verl_ext.distill_actor_loss import packed_logits

        engine = teacher.engine
        model_inputs, output_args = engine.prepare_model_inputs(micro_batch=micro_batch)
        captured = []
        with torch.no_grad(), _engine_autocast(engine), _final_hidden(engine.module, captured, hidden is not None):
            output = engine.module(**model_inputs, use_cache=False)
        if hidden is not None:
            hidden.append(packed_logits(captured[0], micro_batch, output_args))  # any last dim: the same packing
        return packed_logits(output.logits, micro_batch, output_args), output_args

    def teacher_logits(self, micro_batch, rows=None, hidden: list | None = None):
        """The teachers of this micro-batch (a distill_actor_loss.TeacherPass): the loss-level teacher at
        opd.temperature over the student's packed positions (only ``rows`` of them when given: the response rows),
        and its sampled-token log-probs at the rollout temperature for the alignment check against verl's
        reference pass. ``hidden`` (a list): each teacher's final hidden states at those rows are appended."""
        from opd_verl.verl_ext.distill_actor_loss import coarsest_dtype, packed_rollout_temperature, teacher_pass

        raw, output_args, packed = [], None, ([] if hidden is not None else None)
        for teacher in self.teachers:
            logits, output_args = self._teacher_forward(teacher, micro_batch, packed)
            raw.append(logits)
        if hidden is not None:
            hidden.extend(h if rows is None else h.index_select(0, rows.to(h.device)) for h in packed)
        return teacher_pass(
            raw,
            labels=output_args["input_ids_rmpad_rolled"],
            rollout_t=packed_rollout_temperature(micro_batch, output_args),
            tau=float(self.opd_options["temperature"]),
            weights=[t["weight"] for t in self.teacher_entries],
            mode=self.opd_options["multi_teacher_mode"],
            sample_teacher=self._sample_teachers(micro_batch),
            lengths=micro_batch["input_ids"].offsets().diff(),
            compute_dtype=coarsest_dtype(*[_engine_dtype(t.engine) for t in self.teachers]),
            chunk_size=int(self.opd_options.get("chunk_size", 1024)),
            rows=rows,
        )

    def _mean_logit_processor(self):
        """verl logits processor for the first teacher's reference pass under mean_logit: given its packed logits
        (divided by T by verl) and the micro-batch, run the other teachers on the micro-batch and return
        {MEAN_LOGIT_REF_KEY: log_softmax(Σ w_k z_k / T) at the sampled tokens [1, nnz]} (T as verl divides by it,
        distill_actor_loss.verl_temperature)."""
        from opd_verl.verl_ext.distill_actor_loss import packed_rollout_temperature, verl_temperature

        others = self.teachers[1:]
        weights = [t["weight"] for t in self.teacher_entries]
        chunk = int(self.opd_options.get("chunk_size", 1024))

        def mean_logit_processor(student_logits=None, data=None, model_output=None, **kwargs):
            if student_logits is None:  # the engine's loss call: the reference pass optimises nothing
                return torch.zeros(()), {}
            rest = [self._teacher_forward(teacher, data) for teacher in others]
            output_args = rest[0][1]
            rollout_t = packed_rollout_temperature(data, output_args)
            logits = [student_logits.squeeze(0)] + [z for z, _ in rest]
            # the others divided as verl divided the first: by T in their logits' dtype
            divisors = [1.0] + [verl_temperature(rollout_t, z.dtype) for z, _ in rest]
            mixed = mean_logit_label_log_probs(
                logits, weights, output_args["input_ids_rmpad_rolled"], divisors, chunk_size=chunk
            )
            return {MEAN_LOGIT_REF_KEY: mixed.unsqueeze(0)}

        return mean_logit_processor

    def _mean_logit_ref_log_prob(self, data):
        """Reference pass of multi_teacher_mode=mean_logit: log_softmax(Σ w_k z_k / T) at the sampled tokens.

        verl's engine returns log-probs of one model only; the mixture needs every teacher's logits at once. The
        first teacher's infer_batch runs with a logits processor (verl's `distillation_use_topk` hook: infer_batch
        passes the loss_fn on under compute_loss, and FSDPEngineWithLMHead.prepare_model_outputs hands it the packed
        logits, divided by T, per micro-batch; both pinned in upstream.MIRRORS); the processor runs the other
        teachers' forwards on the same micro-batch (as the loss-level pass does) and returns the mixture's log-probs
        as a model output.
        Micro-batching, dynamic batch sizes and the output layout stay verl's."""
        output = self._processor_pass(data, self._mean_logit_processor(), distillation_only=False)
        if output is None:
            return None
        if MEAN_LOGIT_REF_KEY not in output.keys():
            raise RuntimeError(
                "opd_verl: multi_teacher_mode=mean_logit needs the teachers' logits in the reference pass, which "
                "verl's engine does not materialise with use_fused_kernels=True; drop the first teacher's "
                "model.use_fused_kernels, or set opd.multi_teacher_mode=mean_prob"
            )
        output["log_probs"] = output.pop(MEAN_LOGIT_REF_KEY)
        return output

    def _processor_pass(self, data, processor, distillation_only: bool):
        """The first teacher's infer_batch with ``processor`` as verl's logits processor (the
        `distillation_use_topk` hook: called per micro-batch with the packed logits / T and the micro-batch; its
        per-token outputs come back as model outputs), the other teachers in eval mode for their forwards inside
        it. ``distillation_only``: verl skips the first teacher's sampled-token log-probs."""
        first, others = self.teachers[0], self.teachers[1:]
        flags = {"compute_loss": True, "distillation_use_topk": True, "distillation_only": distillation_only}
        previous = {key: tu.get(data, key) for key in flags}
        tu.assign_non_tensor(data, **flags)
        saved_loss_fn, first.loss_fn = first.loss_fn, processor
        try:
            with ExitStack() as stack:
                for teacher in others:
                    stack.enter_context(teacher.engine.eval_mode())
                return first.infer_batch(data=data)
        finally:
            first.loss_fn = saved_loss_fn
            for key, value in previous.items():
                if value is None:
                    tu.pop(data, key)
                else:
                    tu.assign_non_tensor(data, **{key: value})

    def _sends_payload(self) -> bool:
        """The teachers on a pool, the student's loss-level support=topk|full: the pool sends the loss its top-k
        or the teachers' final hidden states."""
        return self.resident and self._uses_distill_loss() and self.opd_options["support"] in ("topk", "full")

    def _shared_vocab_size(self) -> int:
        """The vocabulary student and teachers share (their configs' vocab_size; padded rows beyond the smallest
        are dropped, as distill_actor_loss.shared_vocab does with the logits)."""
        if getattr(self, "_opd_shared_vocab", None) is None:
            from transformers import AutoConfig
            from verl.utils.fs import copy_to_local

            paths = [self.config.model.path] + [t["path"] for t in self.teacher_entries]
            trust = self.config.model.get("trust_remote_code", False)
            self._opd_shared_vocab = min(
                int(AutoConfig.from_pretrained(copy_to_local(p), trust_remote_code=trust).vocab_size) for p in paths)
        return self._opd_shared_vocab

    def _topk_processor(self):
        """verl logits processor of the pool's payload pass: per micro-batch, the colocated loss-level teacher pass
        (`teacher_logits` on the response rows: each teacher's raw logits, their mixture at τ) and its top-k over
        the shared vocabulary (`teacher_topk`, as the colocated loss), so the numbers are the colocated run's;
        each as [1, nnz] columns (pool_payload.column_outputs), 0 on the rows the loss does not read."""
        from opd_verl.verl_ext.distill_actor_loss import response_rows, scatter_rows, teacher_topk
        from opd_verl.verl_ext.pool_payload import column_outputs

        vocab = self._shared_vocab_size()

        def topk_processor(student_logits=None, data=None, **kwargs):
            if student_logits is None:  # the engine's loss call: nothing to optimise
                return torch.zeros(()), {}
            nnz, rows = student_logits.shape[1], response_rows(data)
            teacher = self.teacher_logits(data, rows)
            ids, logp = teacher_topk(teacher.logits[..., :vocab], self.opd_options, teacher.temperature)
            parts = [ids, logp, teacher.label_log_prob, teacher.resolution]
            return column_outputs(*[scatter_rows(p, rows, nnz) for p in parts])

        return topk_processor

    def _hidden_processor(self):
        """verl logits processor of the pool's support=full payload pass: per micro-batch, each teacher's final
        hidden states on the response rows (0 elsewhere) and the alignment inputs of the colocated teacher pass."""
        from opd_verl.verl_ext.distill_actor_loss import response_rows, scatter_rows
        from opd_verl.verl_ext.pool_payload import hidden_outputs

        def hidden_processor(student_logits=None, data=None, **kwargs):
            if student_logits is None:  # the engine's loss call: nothing to optimise
                return torch.zeros(()), {}
            nnz, rows, hidden = student_logits.shape[1], response_rows(data), []
            teacher = self.teacher_logits(data, rows, hidden)
            return hidden_outputs([scatter_rows(h, rows, nnz) for h in hidden],
                                  scatter_rows(teacher.label_log_prob, rows, nnz),
                                  scatter_rows(teacher.resolution, rows, nnz))

        return hidden_processor

    def _pool_payload(self, data) -> dict:
        """The loss's payload of ``data`` (opd_verl.verl_ext.pool_payload): top-k, or hidden states (full)."""
        from opd_verl.verl_ext.pool_payload import assemble, assemble_hidden

        if self.opd_options["support"] == "full":
            output = self._processor_pass(data, self._hidden_processor(), distillation_only=False)
            return assemble_hidden(output, len(self.teachers))
        output = self._processor_pass(data, self._topk_processor(), distillation_only=False)
        return assemble(output, int(self.opd_options["topk"]))

    def _teacher_heads(self) -> list:
        """The teachers' output heads (opd_verl.verl_ext.teacher_head), read from their checkpoints once."""
        if getattr(self, "_opd_heads", None) is None:
            from opd_verl.verl_ext.teacher_head import load_teacher_head

            self._opd_heads = [load_teacher_head(t["path"], bool((t.get("model") or {}).get("trust_remote_code")))
                               for t in self.teacher_entries]
        return self._opd_heads

    def pool_teacher_pass(self, micro_batch, rows=None):
        """The actor's teacher pass with the teachers on a pool, from the micro-batch's payload: their top-k, or
        (support=full) their logits rebuilt from their final hidden states by their output heads, mixed (or
        routed) at τ as colocated."""
        from opd_verl.verl_ext.distill_actor_loss import TeacherPass, teacher_at_tau
        from opd_verl.verl_ext.pool_payload import hidden_rows, payload_rows

        tau = float(self.opd_options["temperature"])
        if self.opd_options["support"] != "full":
            ids, logp, label, resolution = payload_rows(micro_batch, rows)
            return TeacherPass(None, tau, label, resolution, topk=(ids, logp), vocab=self._shared_vocab_size())
        hidden, label, resolution = hidden_rows(micro_batch, rows, len(self.teacher_entries))
        raw = [head.logits(h) for head, h in zip(self._teacher_heads(), hidden)]
        logits, divisor = teacher_at_tau(raw, tau, [t["weight"] for t in self.teacher_entries],
                                         self.opd_options["multi_teacher_mode"], self._sample_teachers(micro_batch),
                                         micro_batch["input_ids"].offsets().diff(),
                                         int(self.opd_options.get("chunk_size", 1024)), rows)
        return TeacherPass(logits, divisor, label, resolution)


MEAN_LOGIT_REF_KEY = "opd_mean_logit_log_prob"


def update_actor_flags(opd: dict) -> dict:
    """The flags the loss-level mode sets on the actor's batch for verl 0.9.1's FSDPEngineWithLMHead.
    prepare_model_outputs: `distillation_use_topk` (support topk/full: the loss is called first as a logits
    processor with the student's logits) and `distillation_only` (the engine then skips the student's sampled-token
    log-probs, model_output["log_probs"], as under verl's own distillation without policy gradient). Only verl's
    ppo_loss (its policy, entropy and KL terms) and support=sampled read them; opd_actor_loss skips ppo_loss when
    opd.lambda_rl = 0 (and the options refuse an entropy or KL loss then)."""
    flags = {"distillation_only": opd["support"] != "sampled" and float(opd["lambda_rl"]) == 0}
    if opd["support"] in ("topk", "full"):
        flags["distillation_use_topk"] = True
    return flags


def _engine_dtype(engine) -> torch.dtype | None:
    """The dtype an FSDP engine computes its forward in (mixed_precision.param_dtype; verl 0.9.1 keeps it as
    `_autocast_dtype`)."""
    return getattr(engine, "_autocast_dtype", None)


@contextmanager
def _final_hidden(module, captured: list, enabled: bool = True):
    """Within it, a forward of the causal LM ``module`` appends to ``captured`` its final hidden state: the input
    of its output embedding (lm_head), after the final norm, in the dtype lm_head computes in (the autocast dtype
    when one is on, as the matmul casts it)."""
    if not enabled:
        yield
        return

    def hook(_, args):
        hidden = args[0]
        device = hidden.device.type
        if torch.is_autocast_enabled(device) and hidden.is_floating_point():
            hidden = hidden.to(torch.get_autocast_dtype(device))
        captured.append(hidden.detach())

    handle = module.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _engine_autocast(engine):
    """The autocast an engine's own forward_step uses (none for fp32), also disabling an enclosing one."""
    dtype = _engine_dtype(engine)
    if dtype is None:
        return nullcontext()
    from verl.utils.device import get_device_name

    if dtype == torch.float32:
        return torch.autocast(device_type=get_device_name(), enabled=False)
    return torch.autocast(device_type=get_device_name(), dtype=dtype)


def make_worker_class(opd_options: dict, teacher_entries: list[dict]) -> type[OPDWorker]:
    """An OPDWorker subclass carrying the run's options (Ray pickles the class into each worker)."""
    from opd_verl.checks.teacher_pool import pool_shape

    return type("OPDWorker", (OPDWorker,), {"opd_options": opd_options, "teacher_entries": teacher_entries,
                                            "resident": pool_shape(opd_options) is not None})
