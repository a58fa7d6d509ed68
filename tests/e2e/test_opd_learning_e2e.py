"""OPD learns, end to end on CPU: a teacher trained here and a weaker student, a few OPD steps through
`python -m opd_verl.main_opd` with the demo's recipes on the demo's task: recipes/demo_cpu_forward_kl.yaml (what
`python -m opd_verl.demo` runs; in CI) and recipes/demo_cpu.yaml (the sampled advantage; slow).

The teacher is a small version of the demo's (opd_verl.demo.build with the settings below, ~15 s of SFT on
2 cores). The student is that teacher with Gaussian noise added to its weight matrices: much weaker (greedy
accuracy near 0, per-token reverse KL ~1.8), and its gap to the teacher can be closed within a few steps, which
is what makes this a sharp test of the OPD signal. (The demo's SFT student narrows its gap slowly: in
bench/results/sample_efficiency.json its per-token KL falls by ~30-40% only after 20-40 steps, too noisy a
margin for a CI test.) Asserted, as the issue asks: the per-token reverse KL falls by >= 30% and the reward
rises.
"""

from __future__ import annotations

import pytest

from cpu_run import REPO, console_metrics, run_main

pytestmark = pytest.mark.e2e

STEPS = 16
TIMEOUT = 900


def _settings():
    from opd_verl.demo.build import BuildSettings, ModelSpec
    from opd_verl.demo.sft import SFTConfig

    return BuildSettings(
        teacher=ModelSpec(hidden_size=64, num_layers=2, seed=1),
        teacher_sft=SFTConfig(steps=900, batch_size=64, lr=3e-3, warmup_steps=30, eval_every=100, target=0.8),
        teacher_min_accuracy=0.5,
        # the build's own SFT student is not used (see the module docstring); keep its SFT short
        student=ModelSpec(hidden_size=64, num_layers=1, seed=2),
        student_sft=SFTConfig(steps=20, batch_size=64, lr=3e-3, warmup_steps=5, eval_every=10, target=0.0),
        val_prompts=100,
    )


NOISE = 0.6  # noise std as a fraction of each weight matrix's own std


def perturbed_copy(src, dst, noise: float, seed: int = 0):
    """Save a copy of the model at `src` with N(0, (noise * std(W))^2) added to every weight matrix W."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd_verl.demo.runs import copy_tokenizer_files

    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=gen) * param.std() * noise)
    model.save_pretrained(dst)
    copy_tokenizer_files(src, dst)
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from opd_verl.demo.build import build

    b = build(_settings(), cache_dir=tmp_path_factory.mktemp("learning_build"))
    b.noisy_student = perturbed_copy(b.teacher, tmp_path_factory.mktemp("noisy_student"), NOISE)
    return b


def _mean(values):
    return sum(values) / len(values)


def run_opd_steps(student, teacher, data, tmp_path, *extra, recipe="demo_cpu"):
    """STEPS OPD steps of recipes/<recipe>.yaml from `student` towards `teacher` on the demo task's `data` (its train and
    val files), with greedy validation before training and after the last step; returns the console metrics per
    step (step 0: the validation before training)."""
    overrides = [
        "--config-dir", str(REPO), f"+recipes={recipe}",
        f"actor_rollout_ref.model.path={student}",
        f"opd.teacher.path={teacher}",
        f"data.train_files={data['train']}",
        f"data.val_files={data['val']}",
        f"trainer.total_training_steps={STEPS}",
        f"trainer.test_freq={STEPS}",
        "trainer.val_before_train=True",
        f"trainer.default_local_dir={tmp_path / 'checkpoints'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *extra,
    ]
    result = run_main(overrides, tmp_path / "opd.log", timeout=TIMEOUT)
    assert not result.timed_out, f"OPD run hung; log tail:\n{result.log[-4000:]}"
    assert result.returncode == 0, result.log[-6000:]
    steps = console_metrics(result.log)
    assert sorted(s for s in steps if s > 0) == list(range(1, STEPS + 1)), sorted(steps)
    return steps


def learning_curves(steps):
    """(per-token reverse KL per step, greedy val accuracy before training and after the last step, accuracy of
    the sampled answers per step) of a run_opd_steps run."""
    from opd_verl.demo.runs import val_accuracy_key

    kl = [steps[s]["opd/kl_per_token"] for s in range(1, STEPS + 1)]
    val_key = val_accuracy_key(steps)
    assert val_key and val_key in steps[0], f"no validation accuracy before training: {sorted(steps)}"
    score = [steps[s]["critic/score/mean"] for s in range(1, STEPS + 1)]
    return kl, steps[0][val_key], steps[STEPS][val_key], score


@pytest.mark.parametrize("recipe", ["demo_cpu_forward_kl", pytest.param("demo_cpu", marks=pytest.mark.slow)])
def test_opd_lowers_the_kl_and_raises_the_reward(built, tmp_path, recipe):
    teacher_acc = built.info["teacher"]["val_accuracy"]
    assert teacher_acc >= 0.5, teacher_acc

    kl, val_before, val_after, score = learning_curves(
        run_opd_steps(built.noisy_student, built.teacher, built.data, tmp_path, recipe=recipe))
    kl_start, kl_end = _mean(kl[:3]), _mean(kl[-3:])
    assert kl_end <= 0.7 * kl_start, f"per-token reverse KL fell only from {kl_start:.3f} to {kl_end:.3f}: {kl}"

    # reward: greedy accuracy on the val split before training and after the last step, and the per-step
    # accuracy of the sampled answers (first vs last steps)
    assert val_before < teacher_acc - 0.2, f"the student must be weaker: {val_before:.3f} vs teacher {teacher_acc:.3f}"
    assert val_after > val_before, f"greedy val accuracy {val_before:.3f} -> {val_after:.3f}"
    assert _mean(score[-3:]) > _mean(score[:3]), f"sampled accuracy per step: {score}"
