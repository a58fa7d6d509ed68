"""The OPD trainer: verl's synchronous v1 PPO trainer with the teacher in the reference role and OPD advantages
(verl extension point: the trainer class; targets verl 0.9.1 `verl/trainer/ppo/v1/trainer_base.py`)."""

from __future__ import annotations

import os

import numpy as np
import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.ray_trainer import apply_kl_penalty
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import response_to_nested

from opd_verl.verl_ext.checkpoints import checkpoints_to_keep, mark_complete, prune_complete, repair_tracker
from opd_verl.verl_ext.estimators import compute_opd_advantage, compute_opd_hybrid_advantage, distill_metrics
from opd_verl.checks.verl_config import POLL_INTERVAL_KEY, replay_poll_interval
from opd_verl.checks.modes import OPD_ESTIMATORS, uses_opd
from opd_verl.checks.teachers import teacher_entries
from opd_verl.verl_ext.task_metrics import per_task, reward_metrics
from opd_verl.verl_ext.teacher_batch import ALIGNMENT_FIELD, alignment_metrics
from opd_verl.verl_ext.served_teacher import is_served, served_ref_log_prob, served_worker_class
from opd_verl.verl_ext.teacher_pool import POOL_NAME, build_teacher_group, place_on_pool, pool_spec
from opd_verl.verl_ext.teacher_worker import make_worker_class
from opd_verl.checks.teacher_pool import pool_shape


TOKEN_DUMP_ENV = "OPD_VERL_DUMP_TOKENS"

#: Every metric of ours is under opd/ (the actor loss's too: verl logs them as actor/opd/*, hoisted here). The
#: names before 0.2 (distill/*, actor/distill/*) were dropped in 0.2 (docs/CHANGELOG.md).
METRIC_NAMESPACE = "opd/"


def hoist_actor_metrics(metrics: dict) -> None:
    """actor/opd/x -> opd/x (one namespace for the plugin's metrics), in place."""
    prefix = "actor/" + METRIC_NAMESPACE
    for key in [k for k in metrics if k.startswith(prefix)]:
        metrics[METRIC_NAMESPACE + key[len(prefix):]] = metrics.pop(key)


class OPDTrainer(PPOTrainerSync):
    """PPOTrainerSync whose reference is the teacher and whose advantage step sees teacher and student log-probs."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # checkpoint rotation is ours (see opd_verl.verl_ext.checkpoints): verl's would delete the previous actor too early
        self.checkpoints_to_keep = checkpoints_to_keep(config.trainer)
        with open_dict(config.trainer):
            config.trainer.max_actor_ckpt_to_keep = None
            config.trainer.max_critic_ckpt_to_keep = None
            config.trainer.remove_previous_ckpt_in_save = False
        self.opd = OmegaConf.to_container(config.opd, resolve=True)
        self.opd_active = uses_opd(config)
        self.teachers_routed = self.opd_active and self.opd.get("multi_teacher_mode") == "route" and len(
            teacher_entries(self.opd)) > 1
        # teachers with another tokenizer: their alignment counts come back from the reference pass (teacher_batch)
        self.alignment_fields = {
            i: ALIGNMENT_FIELD.format(index=i) for i, entry in enumerate(teacher_entries(self.opd))
            if entry.get("cross_tokenizer")
        } if self.opd_active else {}
        if self.opd_active:
            self.use_reference_policy = True

    def _build_replay_buffer(self):
        buffer = super()._build_replay_buffer()
        interval = replay_poll_interval(self.config)
        custom = OmegaConf.select(self.config, "trainer.v1.sampler.custom_sampler.path", default=None)
        if interval is not None and not custom and hasattr(buffer, "poll_interval"):  # a custom sampler owns its kwargs
            buffer.poll_interval = interval
            print(f"opd_verl: replay buffer poll interval {interval:g} s ({POLL_INTERVAL_KEY})")
        return buffer

    def _update_actor(self, batch, metrics: dict):
        batch = super()._update_actor(batch, metrics)
        if self.opd_active:
            hoist_actor_metrics(metrics)
        return batch

    # verl puts the reference inside a LoRA actor (adapter off) and builds none; with OPD the reference is the
    # teacher, which must stay a separate model.
    @property
    def ref_in_actor(self) -> bool:
        return False if getattr(self, "opd_active", False) else self._ref_in_actor

    @ref_in_actor.setter
    def ref_in_actor(self, value: bool) -> None:
        self._ref_in_actor = value

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not uses_opd(self.config):
            return
        opd = OmegaConf.to_container(self.config.opd, resolve=True)
        worker_cls = make_worker_class(opd, teacher_entries(self.config.opd))
        if is_served(opd):  # the teacher is verl's teacher pool (Role.TeacherModel); the actor builds none
            served = ray.remote(served_worker_class(worker_cls))
            self.role_worker_mapping.pop(Role.RefPolicy, None)
            self.mapping.pop(Role.RefPolicy, None)
            role = Role.Actor if Role.Actor in self.role_worker_mapping else Role.ActorRollout
            pool = self.mapping.pop(Role.ActorRolloutRef, None) or self.mapping[role]
            self.role_worker_mapping.pop(Role.ActorRolloutRef, None)
            self.role_worker_mapping[role], self.mapping[role] = served, pool
            return
        worker_cls = ray.remote(worker_cls)
        shape = pool_shape(self.config.opd)
        if shape is not None:  # the teachers on a pool of their own (opd_verl.verl_ext.teacher_pool)
            place_on_pool(self.role_worker_mapping, self.mapping, worker_cls, Role)
            self.resource_pool_manager.resource_pool_spec[POOL_NAME] = pool_spec(shape)
            return
        if Role.Actor in self.role_worker_mapping:  # separate actor and reference worker groups
            self.role_worker_mapping[Role.Actor] = worker_cls
            self.role_worker_mapping[Role.RefPolicy] = worker_cls
            self.mapping[Role.RefPolicy] = self.mapping[Role.Actor]
            return
        pool = self.mapping.pop(Role.ActorRollout, None) or self.mapping[Role.ActorRolloutRef]
        self.role_worker_mapping.pop(Role.ActorRollout, None)
        self.role_worker_mapping[Role.ActorRolloutRef] = worker_cls
        self.mapping[Role.ActorRolloutRef] = pool

    def _compute_ref_log_prob(self, batch, metrics: dict):
        if not (getattr(self, "opd_active", False) and is_served(self.opd)):
            return super()._compute_ref_log_prob(batch, metrics)
        # the served teacher scored each sample as its rollout finished: its q_t takes the reference pass's place
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["teacher_logprobs", "teacher_ids", "input_ids", "response_mask"])
        data["ref_log_prob"] = served_ref_log_prob(data["teacher_logprobs"], data["teacher_ids"], data["input_ids"],
                                                   data["response_mask"])
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data.select("ref_log_prob"))
        return batch

    def _setup(self):
        super()._setup()
        # verl builds a separate reference group only beside a non-hybrid actor: the pool's is built here
        opd = self.config.opd
        if uses_opd(self.config) and pool_shape(opd) is not None and not is_served(opd):
            self.ref_policy_wg = build_teacher_group(self, Role)
            print(f"opd_verl: teachers on {POOL_NAME} {self.resource_pool_manager.resource_pool_spec[POOL_NAME]} "
                  f"(GPUs per node), the student on {self.resource_pool_manager.resource_pool_spec['global_pool']}")

    def _checkpoint_root(self) -> str:
        root = self.config.trainer.default_local_dir
        return root if os.path.isabs(root) else os.path.join(os.getcwd(), root)

    def _save_checkpoint(self):
        super()._save_checkpoint()
        if self.config.actor_rollout_ref.actor.get("checkpoint", {}).get("async_save", False):
            return  # verl's save is still in flight (and it writes no tracker): nothing is complete yet
        root = self._checkpoint_root()
        mark_complete(os.path.join(root, f"global_step_{self.global_steps}"))
        if self.checkpoints_to_keep:
            for step in prune_complete(root, self.checkpoints_to_keep):
                print(f"opd_verl: removed checkpoint global_step_{step} (keeping {self.checkpoints_to_keep})")

    def _load_checkpoint(self):
        if self.config.trainer.resume_mode == "auto":
            message = repair_tracker(self._checkpoint_root())
            if message:
                print(f"opd_verl: {message}")
        return super()._load_checkpoint()

    def _compute_advantage(self, batch, metrics: dict):
        estimator = self.config.algorithm.adv_estimator
        if estimator not in OPD_ESTIMATORS:
            if self.opd_active:
                padded = self._log_distill_metrics(batch, metrics)
                if os.environ.get(TOKEN_DUMP_ENV):
                    self._dump_token_terms(batch, padded)
            return super()._compute_advantage(batch, metrics)
        # Mirrors PPOTrainer._compute_advantage (verl 0.9.1) and adds the teacher's and the student's log-probs.
        fields = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "ref_log_prob"]
        if self.use_critic:
            fields.append("values")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        data = DataProto(batch=data.to_padded_tensor())
        data.batch["token_level_scores"] = data.batch["rm_scores"]
        data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)
        if self.config.algorithm.use_kl_in_reward:
            data, kl_metrics = apply_kl_penalty(data, kl_ctrl=self.kl_ctrl_in_reward, kl_penalty=self.config.algorithm.kl_penalty)
            metrics.update(kl_metrics)
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]
        rollout_correction = self._rollout_correction(data, metrics)  # verl's step 2, before the advantages

        mask = data.batch["response_mask"]
        teacher, student = data.batch["ref_log_prob"], data.batch["old_log_probs"]
        metrics.update(distill_metrics(teacher, student, mask, self._task_metrics(batch, metrics)))
        self._cross_tokenizer_metrics(batch, metrics)
        common = dict(teacher_log_prob=teacher, student_log_prob=student, opd_config=self.opd, metrics=metrics)
        if estimator == "opd":
            advantages, returns = compute_opd_advantage(data.batch["token_level_rewards"], mask, **common)
        else:
            data = compute_advantage_for_multi_trajectories(
                data,
                batch_keys=batch.keys,
                adv_estimator=self.opd["hybrid_base_estimator"],
                gamma=self.config.algorithm.gamma,
                lam=self.config.algorithm.lam,
                num_repeat=self.config.actor_rollout_ref.rollout.n,
                norm_adv_by_std_in_grpo=self.config.algorithm.get("norm_adv_by_std_in_grpo", True),
                config=self.config.algorithm,
            )
            advantages, returns = compute_opd_hybrid_advantage(
                data.batch["token_level_rewards"],
                mask,
                base_advantages=data.batch["advantages"],
                base_returns=data.batch["returns"],
                **common,
            )
        data.batch["advantages"], data.batch["returns"] = advantages, returns
        if os.environ.get(TOKEN_DUMP_ENV):
            self._dump_token_terms(batch, data.batch)

        out_fields = ["advantages", "returns"] + (["token_level_rewards"] if self.config.algorithm.use_kl_in_reward else [])
        if rollout_correction:
            out_fields.append("response_mask")
            if "rollout_is_weights" in data.batch:
                out_fields.append("rollout_is_weights")
        output = TensorDict(
            {field: response_to_nested(data.batch[field], response_mask) for field in out_fields}, batch_size=len(batch)
        )
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

    def _rollout_correction(self, data, metrics: dict) -> bool:
        """verl's rollout correction (algorithm.rollout_correction: IS weights, rejection sampling, rollout_corr/*
        metrics), as PPOTrainer._compute_advantage applies it (decoupled mode only); True when it ran."""
        config = self.config.algorithm.get("rollout_correction", None)
        bypass = config and config.get("bypass_mode", False)
        if config is None or "rollout_log_probs" not in data.batch or bypass:
            return False
        corrected, is_metrics = compute_rollout_correction_and_add_to_batch(data, config)
        data.batch.update(corrected.batch)
        metrics.update(is_metrics)
        return True

    def _cross_tokenizer_metrics(self, batch, metrics: dict) -> None:
        """opd/cross_tokenizer/* of each teacher with another tokenizer (opd/cross_tokenizer/teacher<i>/* when there
        are several): aligned_byte_frac, student_tokens_per_span, teacher_tokens_per_span, masked_special_tokens,
        unaligned_tokens, mismatched_samples (token_alignment.AlignmentStats), over the whole batch."""
        fields = getattr(self, "alignment_fields", {})
        if not fields:
            return
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(fields.values()))
        for i, field in fields.items():
            prefix = "opd/cross_tokenizer/" + (f"teacher{i}/" if len(fields) > 1 else "")
            for name, value in alignment_metrics(data[field]).items():
                metrics[prefix + name] = value

    def _task_metrics(self, batch, metrics: dict) -> list[str] | None:
        """Per-task metrics of a batch of several data_sources, or of any batch when the teachers are routed
        (multi_teacher_mode=route, several teachers): the reward per data_source (opd/reward/<data_source>,
        opd/reward_extra/<key>/<data_source>, task_metrics) into ``metrics``. Returns each sample's data_source
        then, for the KL per data_source (opd/kl_per_token/<data_source>, distill_metrics); None otherwise."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["data_source"])
        sources = [str(x) for x in tu.get(data, "data_source")]
        if not per_task(sources, getattr(self, "teachers_routed", False)):
            return None
        scores = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
        scores = scores.to_padded_tensor()["rm_scores"].sum(-1).tolist()
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extras = [x.get("reward_extra_info") if isinstance(x, dict) else None
                  for x in (tu.get(data, "extra_fields") or [None] * len(sources))]
        metrics.update(reward_metrics(sources, scores, extras))
        return sources

    def _dump_token_terms(self, batch, padded) -> None:
        """Debug dump ($OPD_VERL_DUMP_TOKENS=dir): ids and per-token terms of each step, to recompute offline."""
        ids = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id,
            select_fields=["prompts", "responses", "data_source", "raw_prompt", "reward_model", "extra_info"],
        )
        directory = os.environ[TOKEN_DUMP_ENV]
        os.makedirs(directory, exist_ok=True)
        torch.save(
            {
                "prompts": [t.clone() for t in ids["prompts"].unbind()],
                "responses": [t.clone() for t in ids["responses"].unbind()],
                "data_source": [str(x) for x in tu.get(ids, "data_source")],
                # the dataset's columns, to rebuild a teacher's own prompt (opd.teacher.prompt) offline
                **{key: [_plain_value(x) for x in tu.get(ids, key)] for key in ("raw_prompt", "reward_model", "extra_info")},
                **{k: padded[k].clone() for k in ("response_mask", "ref_log_prob", "old_log_probs", "advantages")
                   if k in padded.keys()},  # no advantages yet on a non-OPD estimator's path
            },
            os.path.join(directory, f"step_{self.global_steps}.pt"),
        )

    def _log_distill_metrics(self, batch, metrics: dict) -> "TensorDict":
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask", "old_log_probs", "ref_log_prob"]
        ).to_padded_tensor()
        metrics.update(distill_metrics(data["ref_log_prob"], data["old_log_probs"], data["response_mask"],
                                       self._task_metrics(batch, metrics)))
        self._cross_tokenizer_metrics(batch, metrics)
        metrics["opd/kl_coef"] = float(self.opd["lambda_distill"])
        return data


def _plain_value(value):
    """A dataset column's value as plain python (lists, dicts), for torch.save."""
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain_value(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def trainer_class(config):
    # trainer_base compares trainer_mode == "sync" in several places, so the mode stays "sync" and the class is ours.
    mode = config.trainer.v1.trainer_mode
    if mode != "sync":
        raise ValueError(f"trainer.v1.trainer_mode={mode} is not supported by opd_verl; set trainer.v1.trainer_mode=sync")
    return OPDTrainer
