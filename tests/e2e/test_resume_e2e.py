"""Crash-safe resume, end to end: a real OPD run on CPU (verl's Ray trainer, vLLM, parquet, a tiny model) killed
with SIGKILL (its whole process group at once) while it writes a checkpoint, then resumed with
`trainer.resume_mode=auto`. Two runs (4 steps, a checkpoint every 2 steps, keep 1 checkpoint):

1. run 1 is killed after global_step_2 is complete, inside the last write of global_step_4: verl's tracker
   `latest_checkpointed_iteration.txt` (open(..., "w") truncates it, then the step is written). Left behind:
   global_step_2 complete; global_step_4 with all its files but not marked complete; an empty tracker (verl
   alone would crash on it: int("")).
2. run 2 resumes: the tracker is repaired to global_step_2 (opd_verl.verl_ext.checkpoints), never global_step_4; steps 3
   and 4 train on the prompts run 1 trained on at steps 3 and 4; the run finishes with global_step_4 complete
   and global_step_2 rotated away.

Where the kill lands is made deterministic without a hook in the code under test: the tracker is swapped for a
named pipe (mkfifo) once global_step_2 is complete, so verl's open() of it blocks until the process group is
killed; then the pipe is replaced by what a kill inside that write leaves in a regular file: an empty file. (A kill
earlier in the save, e.g. inside data.pt, leaves the tracker on global_step_2: verl writes it last, synchronously.)

The prompts, responses and per-token log-probs of each step come from OPD's per-step dump (OPD_VERL_DUMP_TOKENS),
written before the checkpoint. The teacher differs from the student and rollouts are greedy (`rollout.top_k=1`),
so the resumed steps 3 and 4 must reproduce run 1's: the student's log-probs at step 3 are those of the weights after
2 updates (a resume that lost the actor's weights would score them with the initial model), and at step 4 those
after an update made with the restored optimizer state and learning-rate schedule.

    pytest -q -m e2e tests/e2e/test_resume_e2e.py
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from cpu_run import (
    console_metrics, float64_log_probs, grpo_overrides, prepare_workdir, run_main, run_processes, sigkill_run, start_main, write_model,
)

pytestmark = pytest.mark.e2e

WAIT_S = 900  # for each phase of a run (start-up and a few steps: ~1.5 min on 2 idle cores, 8 min seen under load)
TRACKER = "latest_checkpointed_iteration.txt"
MARKER = ".opd_verl_complete"


class Chain:
    def __init__(self, root: Path):
        self.w = prepare_workdir(root)
        self.teacher = write_model(root / "teacher", hidden_size=256, num_layers=2, seed=1)
        self.ckpt = root / "checkpoints"
        self.root = root

    def overrides(self, name: str) -> list[str]:
        return grpo_overrides(
            self.w,
            **{
                "algorithm.adv_estimator": "opd",
                "opd.teacher.path": self.teacher,
                "actor_rollout_ref.rollout.top_k": 1,
                "actor_rollout_ref.actor.optim.lr": 1e-3,
                "actor_rollout_ref.actor.policy_loss.loss_mode": "importance_sampling",
                "trainer.experiment_name": name,
                "trainer.total_training_steps": 4,
                "trainer.save_freq": 2,
                "trainer.max_actor_ckpt_to_keep": 1,
                "trainer.resume_mode": "auto",
                "trainer.default_local_dir": str(self.ckpt),
            },
        )

    def dump(self, run: int) -> Path:
        return self.root / f"dump_run{run}"

    def log(self, run: int) -> Path:
        return self.root / f"run{run}.log"

    def prompts(self, run: int, step: int) -> list[tuple[int, ...]]:
        """The prompt token ids of one step (each prompt once per sample), order-free."""
        return sorted(prompt for prompt, _, _ in self.samples(run, step))

    def samples(self, run: int, step: int) -> list[tuple[tuple[int, ...], tuple[int, ...], list[float]]]:
        """(prompt ids, response ids, the student's log-probs of the response) of each sample of a step, sorted."""
        import torch

        saved = torch.load(self.dump(run) / f"step_{step}.pt")
        rows = []
        for i, (prompt, response) in enumerate(zip(saved["prompts"], saved["responses"])):
            n = int(saved["response_mask"][i].sum())
            rows.append((tuple(prompt.tolist()), tuple(response.tolist()), saved["old_log_probs"][i, :n].tolist()))
        return sorted(rows)


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _wait(proc, log: Path, what: str, condition, timeout: float = WAIT_S) -> None:
    """Poll `condition` until true; fail (with the log tail) if the run ends first or the time is up."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}; log tail:\n{_tail(log)}")
        if time.monotonic() > deadline:
            sigkill_run(proc)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{_tail(log)}")
        time.sleep(0.5)


def _complete(step_dir: Path) -> bool:
    return (step_dir / MARKER).is_file()


def _tracker(ckpt: Path) -> str | None:
    try:
        return (ckpt / TRACKER).read_text()
    except OSError:
        return None


def _blocked_on_a_pipe(proc) -> bool:
    """Some thread of the run waits in open() of a named pipe for a reader (Linux wchan `wait_for_partner`)."""
    for pid in run_processes(proc):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                if Path(f"/proc/{pid}/task/{tid}/wchan").read_text().strip() == "wait_for_partner":
                    return True
            except OSError:
                pass
    return False


def _kill(proc, log: Path) -> None:
    survivors = sigkill_run(proc)
    assert not survivors, "processes of the run outlived SIGKILL of its process group by 30 s:\n" + "\n".join(survivors)
    assert proc.returncode == -9, f"the run was not the one killed (exit {proc.returncode}); log tail:\n{_tail(log)}"


def _found_checkpoints(log: str) -> list[str]:
    """The step folders verl's find_latest_ckpt_path reported ("Found checkpoint: %s <path>")."""
    return re.findall(r"Found checkpoint:.*?(global_step_\d+)", log)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return Chain(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def killed(chain):
    """Run 1, killed inside verl's write of the tracker of global_step_4; returns its log."""
    tracker, step2, step4 = chain.ckpt / TRACKER, chain.ckpt / "global_step_2", chain.ckpt / "global_step_4"
    proc = start_main(chain.overrides("resume"), chain.log(1), env={"OPD_VERL_DUMP_TOKENS": str(chain.dump(1))})
    try:
        _wait(proc, chain.log(1), "global_step_2 complete", lambda: _complete(step2) and _tracker(chain.ckpt) == "2")
        # step 4's save is at least a step and a half away; nothing reads the tracker before it
        assert not step4.exists(), "global_step_4 exists before step 3 ran"
        os.mkfifo(chain.ckpt / "tracker.fifo")
        os.replace(chain.ckpt / "tracker.fifo", tracker)
        _wait(
            proc,
            chain.log(1),
            "verl blocked in the write of the tracker",
            lambda: _blocked_on_a_pipe(proc) and (step4 / "data.pt").exists(),  # data.pt comes just before
        )
        time.sleep(1)  # nothing can get past the pipe: the kill lands inside the write either way
        state = {
            "global_step_2 files": sorted(str(p.relative_to(step2)) for p in step2.rglob("*")),
            "global_step_4 files": sorted(str(p.relative_to(step4)) for p in step4.rglob("*")),
        }
    except BaseException:
        sigkill_run(proc)
        raise
    _kill(proc, chain.log(1))
    # a kill between open(tracker, "w") (which truncates) and the write leaves an empty tracker
    os.remove(tracker)
    tracker.write_text("")
    return chain.log(1).read_text(errors="replace"), state


@pytest.fixture(scope="module")
def resumed(chain, killed):
    result = run_main(chain.overrides("resume"), chain.log(2), timeout=WAIT_S, env={"OPD_VERL_DUMP_TOKENS": str(chain.dump(2))})
    assert not result.timed_out, f"run 2 hung (killed after {result.seconds:.0f} s); log tail:\n{result.log[-6000:]}"
    assert result.returncode == 0, f"run 2 exited {result.returncode}; log tail:\n{result.log[-6000:]}"
    return result.log


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint_complete(chain, killed):
    log, state = killed
    steps = console_metrics(log)
    assert sorted(s for s in steps if s > 0) == [1, 2, 3], f"run 1 logged steps {sorted(steps)}"
    step2, step4 = chain.ckpt / "global_step_2", chain.ckpt / "global_step_4"
    assert _complete(step2) and not _complete(step4)
    # all of global_step_4 but the tracker had been written: the kill landed at the end of the save
    assert "data.pt" in state["global_step_4 files"], state
    assert any(f.startswith("actor/model_world_size_") for f in state["global_step_4 files"]), state
    # with max_actor_ckpt_to_keep=1 verl itself deletes global_step_2/actor once global_step_4/actor is written,
    # before data.pt and the tracker; opd_verl rotates only after the new checkpoint is complete
    assert any(f.startswith("actor/model_world_size_") for f in state["global_step_2 files"]), state
    assert _tracker(chain.ckpt) == ""
    for step in (1, 2, 3, 4):
        assert (chain.dump(1) / f"step_{step}.pt").exists(), f"run 1 dumped no step {step}"


def test_resume_after_the_kill_continues_at_step_3_from_the_complete_checkpoint(chain, killed, resumed):
    assert "opd_verl: checkpoint tracker" in resumed and "resuming from complete global_step_2" in resumed, (
        "the empty tracker was not repaired"
    )
    assert _found_checkpoints(resumed) == ["global_step_2"], _found_checkpoints(resumed)
    steps = console_metrics(resumed)
    assert sorted(s for s in steps if s > 0) == [3, 4], f"run 2 logged steps {sorted(steps)}"
    assert [steps[s]["training/global_step"] for s in (3, 4)] == [3, 4]
    assert not (chain.dump(2) / "step_1.pt").exists() and not (chain.dump(2) / "step_2.pt").exists()
    # the data order continues: a dataloader restarted from scratch would train step 3 on step 1's prompts
    assert chain.prompts(1, 3) != chain.prompts(1, 1) and chain.prompts(1, 3) != chain.prompts(1, 4)
    assert chain.prompts(2, 3) == chain.prompts(1, 3), "the resumed step 3 trained on other prompts"
    assert chain.prompts(2, 4) == chain.prompts(1, 4), "the resumed step 4 trained on other prompts"
    # finished: global_step_4 rewritten and complete, the tracker on it, the older checkpoint rotated away
    assert _tracker(chain.ckpt) == "4"
    assert _complete(chain.ckpt / "global_step_4")
    assert sorted(p.name for p in chain.ckpt.glob("global_step_*")) == ["global_step_4"]


def _largest_difference(a, b) -> float:
    """max |Δ| between the student's log-probs of two runs' samples (same prompts and responses required)."""
    assert [(p, r) for p, r, _ in a] == [(p, r) for p, r, _ in b], "other responses: the rollouts differ"
    return max(abs(x - y) for (_, _, la), (_, _, lb) in zip(a, b) for x, y in zip(la, lb))


def test_resumed_steps_reproduce_the_uninterrupted_run(chain, killed, resumed):
    """Actor weights, optimizer state and lr schedule restored: steps 3 and 4 of the resumed run score the same
    greedy responses with the same log-probs as run 1 did (which ran steps 3 and 4 before the kill)."""
    import torch

    for step in (3, 4):
        assert _largest_difference(chain.samples(2, step), chain.samples(1, step)) <= 1e-5, f"step {step} differs"
    # what the comparison sees: after 2 updates the student's log-probs are far (> 1e-3) from the initial model's,
    # so a resume that restarted from the initial weights would fail above
    drift = 0.0
    for prompt, response, log_probs in chain.samples(1, 3):
        initial = float64_log_probs(chain.w.model, torch.tensor(prompt), torch.tensor(response))
        drift = max(drift, float((torch.tensor(log_probs, dtype=torch.float64) - initial).abs().max()))
    assert drift > 1e-3, f"the updates moved the student's log-probs by only {drift:.2e}: the check would be blind"
