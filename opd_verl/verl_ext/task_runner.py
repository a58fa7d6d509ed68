"""Runs verl's v1 PPO trainer on Ray with our trainer class (verl extension point: the TaskRunner)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
import ray

from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

# verl wraps TaskRunnerV1 in a Ray actor class; its user class is the one we extend.
_VerlTaskRunner = TaskRunnerV1.__ray_metadata__.modified_class.__mro__[1]


@ray.remote
class OPDTaskRunner(_VerlTaskRunner):
    """verl's TaskRunnerV1 with the trainer class chosen by `trainer_class(config)` instead of the registry."""

    def run(self, config: DictConfig):
        from verl.utils.logging_utils import configure_verl_logging
        import transfer_queue as tq

        from opd_verl.plugin import require_plugin_loaded
        from opd_verl.verl_ext.trainer import trainer_class

        configure_verl_logging()
        require_plugin_loaded()
        trainer_cls = trainer_class(config)
        config.transfer_queue.enable = True
        OmegaConf.resolve(config)
        self.config = config
        tq.init(config.transfer_queue)
        succeeded = False
        try:
            self.trainer = trainer_cls(config=config)
            self.trainer.init()
            self.init_agent_loop_manager()
            self.trainer.fit(self.agent_loop_manager)
            succeeded = True
        finally:
            try:
                tracking = getattr(self.trainer, "logger", None)
                if tracking is not None:
                    tracking.finish(exit_code=0 if succeeded else 1)
            finally:
                tq.close()


def run(config: DictConfig) -> None:
    """verl's own config validation, then Ray and the trainer."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from opd_verl.checks.modes import uses_opd

    # With OPD the reference role holds the teacher, so verl's checks of the reference config apply.
    use_reference_policy = need_reference_policy(config) or uses_opd(config)
    validate_config(config=config, use_reference_policy=use_reference_policy, use_critic=need_critic(config))
    run_ppo(config, task_runner_class=OPDTaskRunner)
