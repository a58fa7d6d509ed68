"""opd_verl.verl_ext.teacher_worker: the teacher's own model config, and verl's decorators on the overridden worker
methods (profiler annotation, MoE router-replay flag)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from opd_verl.demo.tiny_models import build_model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [build_model_dir(root / name, hidden_size=64, num_layers=1, seed=seed) for seed, name in enumerate("st")]


@pytest.fixture
def student_model(composed_config, model_dirs):
    """actor_rollout_ref.model as verl composes it, with student options the teacher must not inherit."""
    model = OmegaConf.create(composed_config()["actor_rollout_ref"]["model"])
    model.path = model_dirs[0]
    model.override_config = {"max_position_embeddings": 8192, "attn_implementation": "sdpa"}  # e.g. a context extension
    model.use_liger = True
    model.use_fused_kernels = True
    model.custom_chat_template = "x"
    model.enable_gradient_checkpointing = False
    model.lora_rank = 8
    return model


def test_teacher_model_config_is_the_teachers_own(student_model, model_dirs):
    from opd_verl.verl_ext.teacher_worker import teacher_model_config

    own = {"path": model_dirs[1], "model": {"override_config": {"rms_norm_eps": 0.5}}}
    teacher = teacher_model_config(student_model, own)
    assert teacher.path == teacher.tokenizer_path == model_dirs[1]
    assert teacher.hf_config.max_position_embeddings == 2048  # the teacher's config.json, not the student's override
    assert teacher.hf_config.rms_norm_eps == 0.5  # the teacher's own override
    assert not teacher.use_liger and not teacher.use_fused_kernels and teacher.custom_chat_template is None
    assert teacher.tokenizer.chat_template != "x"
    assert teacher.enable_gradient_checkpointing and teacher.lora_rank == 0 and not teacher.mtp.enable  # verl's
    # shared with the student: the packed layout, and the attention implementation unless the teacher sets its own
    assert teacher.use_remove_padding is True and teacher.hf_config._attn_implementation == "sdpa"
    student_model.use_remove_padding = False
    eager = {"path": model_dirs[1], "model": {"override_config": {"attn_implementation": "eager"}}}
    teacher = teacher_model_config(student_model, eager)
    assert teacher.use_remove_padding is False and teacher.hf_config._attn_implementation == "eager"


def test_verl_offloads_a_forward_only_engine_whatever_param_offload_says():
    """Why opd.teacher.param_offload was removed: verl 0.9.1's FSDP engine always CPU-offloads a forward-only engine
    (FSDP1 CPUOffload, FSDP2 CPUOffloadPolicy) and its `to()` moves nothing for one. If this changes, revisit."""
    from opd_verl.verl_ext.upstream import upstream_source

    build = upstream_source("verl.workers.engine.fsdp.transformer_impl:FSDPEngine._build_fsdp_module")
    assert "if self.engine_config.forward_only:\n                cpu_offload = CPUOffload(offload_params=True)" in build
    assert "if self.engine_config.offload_policy or self.engine_config.forward_only:" in build
    to = upstream_source("verl.workers.engine.fsdp.transformer_impl:FSDPEngine.to")
    assert "if self.engine_config.forward_only:\n            # force cpu_offload\n            return" in to


class _Recorder:
    """Records what a stage sees: the data's routing-replay flag, and what the profiler is asked to annotate."""

    def __init__(self):
        self.flags, self.annotations = [], []

    def stage(self, data):
        from verl.utils import tensordict_utils as tu

        self.flags.append(tu.get(data, "enable_routing_replay"))
        return None

    def profiler(self):
        recorder = self

        class Impl:
            def annotate(self, **kwargs):
                def decorator(func):
                    def wrapped(worker, data, *args, **kw):
                        from verl.utils import tensordict_utils as tu

                        recorder.annotations.append({**kwargs, "flag_seen": tu.get(data, "enable_routing_replay")})
                        return func(worker, data, *args, **kw)

                    return wrapped

                return decorator

        on = lambda: True  # noqa: E731
        return SimpleNamespace(rank=0, check_enable=on, check_this_step=on, check_this_rank=on, _impl=Impl())


def _worker(recorder, routing_replay):
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    worker = object.__new__(OPDWorker)
    worker.enable_routing_replay = routing_replay
    worker.profiler = recorder.profiler()
    worker.opd_options = {"support": "sampled"}
    worker.config = OmegaConf.create({"actor": {"policy_loss": {"loss_mode": "vanilla"}}})
    worker.teachers = [SimpleNamespace(infer_batch=lambda data: recorder.stage(data))]
    worker.ref = worker.teachers[0]
    worker.actor = SimpleNamespace(train_mini_batch=lambda data: recorder.stage(data))
    return worker


def _data():
    from verl.utils import tensordict_utils as tu

    return tu.get_tensordict({"input_ids": torch.zeros(2, 3, dtype=torch.long)})


@pytest.mark.parametrize(
    "method,flag,annotation",
    [
        ("compute_ref_log_prob", False, {"color": "olive", "role": "ref_compute_log_prob"}),
        ("update_actor", True, {"color": "red", "role": "actor_update", "scheduled": True}),
    ],
)
def test_worker_methods_keep_verls_profiler_and_routing_replay_decorators(method, flag, annotation):
    """As verl 0.9.1's ActorRolloutRefWorker: the profiler annotates the stage (outside), then the router-replay
    flag is set on the batch (inside) when routing replay is on, and left alone when it is off."""
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    recorder = _Recorder()
    getattr(OPDWorker, method)(_worker(recorder, routing_replay=True), _data())
    assert recorder.flags == [flag]
    assert len(recorder.annotations) == 1
    seen = recorder.annotations[0]
    assert {k: seen.get(k) for k in annotation} == annotation and seen["flag_seen"] is None  # verl's order

    recorder = _Recorder()
    getattr(OPDWorker, method)(_worker(recorder, routing_replay=False), _data())
    assert recorder.flags == [None]


@pytest.mark.parametrize(
    "loss_mode,support,lambda_rl,use_topk,only",
    [
        ("ppo_plus_distill", "topk", 0.0, True, True),  # nothing reads the student's sampled-token log-probs
        ("ppo_plus_distill", "full", 0.0, True, True),
        ("ppo_plus_distill", "full", 0.5, True, False),  # verl's ppo_loss reads them
        ("ppo_plus_distill", "topk", 1.0, True, False),
        ("ppo_plus_distill", "sampled", 0.0, None, False),  # the sampled divergence reads them
        ("opd_distill", "topk", 0.0, True, True),  # the deprecated name of the loss-level mode
        ("vanilla", "topk", 0.0, None, None),  # not the loss-level mode: verl's flags untouched
    ],
)
def test_update_actor_skips_the_students_log_probs_exactly_when_no_loss_reads_them(loss_mode, support, lambda_rl,
                                                                                    use_topk, only):
    """update_actor sets verl 0.9.1's `distillation_only` (the FSDP engine then skips model_output["log_probs"])
    in the loss-level mode with support topk/full and opd.lambda_rl = 0, and `distillation_use_topk` (the loss
    gets the student's logits) with support topk/full."""
    from verl.utils import tensordict_utils as tu

    from opd_verl.verl_ext.teacher_worker import OPDWorker

    seen = []
    worker = _worker(_Recorder(), routing_replay=False)
    worker.config = OmegaConf.create({"actor": {"policy_loss": {"loss_mode": loss_mode}}})
    worker.opd_options = {"support": support, "lambda_rl": lambda_rl}
    worker.actor = SimpleNamespace(train_mini_batch=lambda data: seen.append(
        (tu.get(data, "distillation_use_topk"), tu.get(data, "distillation_only"))))
    OPDWorker.update_actor(worker, _data())
    assert seen == [(use_topk, only)]


def test_the_teacher_is_profiled_as_verls_reference(composed_config):
    """verl 0.9.1 builds its reference worker's profiler config from actor_rollout_ref.ref.profiler; the teacher's
    TrainingWorker gets the same (it had profiler_config=None)."""
    from verl.utils.profiler import ProfilerConfig

    from opd_verl.verl_ext.teacher_worker import ref_profiler_config

    ref = OmegaConf.create(composed_config()["actor_rollout_ref"]["ref"])
    assert ref.get("profiler"), "verl's config has a ref.profiler section"
    config = ref_profiler_config(ref)
    assert isinstance(config, ProfilerConfig)
    assert config.tool == ref.profiler.tool
    assert ref_profiler_config(OmegaConf.create({})) is None
