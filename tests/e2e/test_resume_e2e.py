"""Crash-safe resume, end to end: real OPD runs on CPU (verl's Ray trainer, vLLM, parquet, a tiny model), killed
with SIGKILL (the whole process group at once: driver, Ray, vLLM) and resumed with `trainer.resume_mode=auto`.

One chain of three runs (4 steps, a checkpoint every 2 steps, keep 1 checkpoint):

1. run 1 is killed while it writes global_step_4: after the actor's files, inside the write of data.pt (before
   verl's tracker). Left behind: global_step_2 complete, global_step_4 half written.
2. run 2 resumes: from global_step_2 at step 3, with the prompts run 1 trained on at steps 3 and 4. It is killed
   inside verl's write of the tracker `latest_checkpointed_iteration.txt` (open(..., "w"), then write).
   Left behind: an empty tracker, global_step_4 fully written but not marked complete.
3. run 3 resumes: the tracker is repaired to global_step_2 (opd_verl.checkpoints), steps 3 and 4 again with the
   same prompts, and the run finishes with global_step_4 complete and global_step_2 rotated away.

Where each kill lands is made deterministic without a hook in the code under test: the file verl is about to write
is a named pipe (mkfifo), so verl's open() blocks until the process group is killed. Then the pipe is replaced by
what a kill inside that write leaves in a regular file: the first half of data.pt; an empty (truncated) tracker.

The prompts of each step come from OPD's per-step dump (OPD_VERL_DUMP_TOKENS), written before the checkpoint.
The teacher is the student's own model: as cheap as GRPO.

    pytest -q -m e2e tests/e2e/test_resume_e2e.py
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from cpu_run import console_metrics, grpo_overrides, prepare_workdir, run_main, run_processes, sigkill_run, start_main

pytestmark = pytest.mark.e2e

WAIT_S = 900  # for each phase of a run (start-up and a few steps: ~1.5 min on 2 idle cores, 8 min seen under load)
TRACKER = "latest_checkpointed_iteration.txt"
MARKER = ".opd_verl_complete"


class Chain:
    def __init__(self, root: Path):
        self.w = prepare_workdir(root)
        self.ckpt = root / "checkpoints"
        self.root = root

    def overrides(self, name: str) -> list[str]:
        return grpo_overrides(
            self.w,
            **{
                "algorithm.adv_estimator": "opd",
                "opd.teacher.path": self.w.model,
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
        import torch

        saved = torch.load(self.dump(run) / f"step_{step}.pt")
        return sorted(tuple(p.tolist()) for p in saved["prompts"])


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
def run1(chain):
    """Killed while writing global_step_4's data.pt, after global_step_2 is complete."""
    step2, step4 = chain.ckpt / "global_step_2", chain.ckpt / "global_step_4"
    proc = start_main(chain.overrides("resume"), chain.log(1), env={"OPD_VERL_DUMP_TOKENS": str(chain.dump(1))})
    try:
        _wait(proc, chain.log(1), "global_step_2 complete", lambda: _complete(step2) and _tracker(chain.ckpt) == "2")
        # step 4's save is at least a step and a half away: put the pipe where verl will write data.pt
        assert not step4.exists(), "global_step_4 exists before step 3 ran"
        step4.mkdir()
        os.mkfifo(step4 / "data.pt")
        _wait(
            proc,
            chain.log(1),
            "verl blocked in the write of global_step_4/data.pt",
            lambda: (step4 / "actor" / "fsdp_config.json").exists() and _blocked_on_a_pipe(proc),
        )
        time.sleep(1)  # nothing can get past the pipe; the kill lands inside the write either way
    except BaseException:
        sigkill_run(proc)
        raise
    _kill(proc, chain.log(1))
    # what a kill inside torch.save(data.pt) leaves in a regular file: a prefix of it
    os.remove(step4 / "data.pt")
    full = (step2 / "data.pt").read_bytes()
    (step4 / "data.pt").write_bytes(full[: len(full) // 2])
    return chain.log(1).read_text(errors="replace")


@pytest.fixture(scope="module")
def run2(chain, run1):
    """Resumes after run 1; killed inside verl's write of the tracker of global_step_4."""
    tracker, data4 = chain.ckpt / TRACKER, chain.ckpt / "global_step_4" / "data.pt"
    started = time.time()
    proc = start_main(chain.overrides("resume"), chain.log(2), env={"OPD_VERL_DUMP_TOKENS": str(chain.dump(2))})
    try:
        # the tracker was read at start-up; step 3 is running: step 4's save is at least a step away
        _wait(proc, chain.log(2), "the resumed run's step 3", lambda: (chain.dump(2) / "step_3.pt").exists())
        assert _tracker(chain.ckpt) == "2"
        os.mkfifo(chain.ckpt / "tracker.fifo")
        os.replace(chain.ckpt / "tracker.fifo", tracker)
        _wait(
            proc,
            chain.log(2),
            "verl blocked in the write of the tracker",
            lambda: _blocked_on_a_pipe(proc) and data4.stat().st_mtime > started,  # data.pt comes just before
        )
        time.sleep(1)
    except BaseException:
        sigkill_run(proc)
        raise
    _kill(proc, chain.log(2))
    # a kill between open(tracker, "w") (which truncates) and the write leaves an empty tracker
    os.remove(tracker)
    tracker.write_text("")
    return chain.log(2).read_text(errors="replace")


@pytest.fixture(scope="module")
def run3(chain, run2):
    result = run_main(chain.overrides("resume"), chain.log(3), timeout=WAIT_S, env={"OPD_VERL_DUMP_TOKENS": str(chain.dump(3))})
    assert not result.timed_out, f"run 3 hung (killed after {result.seconds:.0f} s); log tail:\n{result.log[-6000:]}"
    assert result.returncode == 0, f"run 3 exited {result.returncode}; log tail:\n{result.log[-6000:]}"
    return result.log


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint_intact(chain, run1):
    steps = console_metrics(run1)
    assert sorted(s for s in steps if s > 0) == [1, 2, 3], f"run 1 logged steps {sorted(steps)}"
    assert _tracker(chain.ckpt) == "2"
    step2, step4 = chain.ckpt / "global_step_2", chain.ckpt / "global_step_4"
    assert _complete(step2) and not _complete(step4)
    # with max_actor_ckpt_to_keep=1 verl itself deletes global_step_2/actor as soon as global_step_4/actor is
    # written, before the tracker moves on; opd_verl rotates only after the new checkpoint is complete
    assert any((step2 / "actor").glob("model_world_size_*.pt")), sorted(p.name for p in step2.rglob("*"))
    for step in (1, 2, 3, 4):
        assert (chain.dump(1) / f"step_{step}.pt").exists(), f"run 1 dumped no step {step}"


def test_sigkilled_run_resumes_at_the_next_step_with_the_same_data(chain, run1, run2):
    assert _found_checkpoints(run2) == ["global_step_2"], _found_checkpoints(run2)
    steps = console_metrics(run2)
    assert sorted(s for s in steps if s > 0) == [3], f"run 2 logged steps {sorted(steps)} (expected 3; 4 was killed in its save)"
    assert steps[3]["training/global_step"] == 3
    assert not (chain.dump(2) / "step_1.pt").exists() and not (chain.dump(2) / "step_2.pt").exists()
    # the data order continues: a dataloader restarted from scratch would train step 3 on step 1's prompts
    assert chain.prompts(1, 3) != chain.prompts(1, 1) and chain.prompts(1, 3) != chain.prompts(1, 4)
    assert chain.prompts(2, 3) == chain.prompts(1, 3), "the resumed step 3 trained on other prompts"
    assert chain.prompts(2, 4) == chain.prompts(1, 4), "the resumed step 4 trained on other prompts"


def test_kill_in_the_tracker_write_resumes_from_the_last_complete_checkpoint(chain, run1, run2, run3):
    assert "opd_verl: checkpoint tracker" in run3 and "resuming from complete global_step_2" in run3, (
        "the empty tracker was not repaired"
    )
    assert _found_checkpoints(run3) == ["global_step_2"], _found_checkpoints(run3)
    steps = console_metrics(run3)
    assert sorted(s for s in steps if s > 0) == [3, 4], f"run 3 logged steps {sorted(steps)}"
    assert [steps[s]["training/global_step"] for s in (3, 4)] == [3, 4]
    assert chain.prompts(3, 3) == chain.prompts(1, 3) and chain.prompts(3, 4) == chain.prompts(1, 4)
    # finished: global_step_4 rewritten and complete, the tracker on it, the older checkpoint rotated away
    assert _tracker(chain.ckpt) == "4"
    step4 = chain.ckpt / "global_step_4"
    assert _complete(step4)
    import torch

    torch.load(step4 / "data.pt", weights_only=False)  # the half-written data.pt was replaced
    assert sorted(p.name for p in chain.ckpt.glob("global_step_*")) == ["global_step_4"]
