"""Crash-safe resume: the tracker is repaired to the newest complete checkpoint (opd_verl.checkpoints)."""

import os

from opd_verl.checkpoints import TRACKER, complete_steps, mark_complete, read_tracker, repair_tracker


def _step(root, n, complete=True):
    d = root / f"global_step_{n}"
    (d / "actor").mkdir(parents=True)
    if complete:
        mark_complete(str(d))
    return d


def test_good_tracker_is_left_alone(tmp_path):
    _step(tmp_path, 2)
    (tmp_path / TRACKER).write_text("2")
    assert repair_tracker(str(tmp_path)) is None and read_tracker(str(tmp_path)) == 2


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert repair_tracker(str(tmp_path)) is None
    assert not os.path.exists(tmp_path / TRACKER)


def test_empty_tracker_from_a_kill_falls_back_to_newest_complete(tmp_path):
    _step(tmp_path, 2)
    _step(tmp_path, 4)
    _step(tmp_path, 6, complete=False)  # killed while writing step 6
    (tmp_path / TRACKER).write_text("")  # killed inside verl's open(..., "w")
    message = repair_tracker(str(tmp_path))
    assert "global_step_4" in message
    assert read_tracker(str(tmp_path)) == 4
    assert complete_steps(str(tmp_path)) == [2, 4]


def test_tracker_pointing_at_a_missing_folder(tmp_path):
    _step(tmp_path, 2)
    (tmp_path / TRACKER).write_text("3")
    repair_tracker(str(tmp_path))
    assert read_tracker(str(tmp_path)) == 2


def test_unreadable_tracker_and_nothing_complete_starts_fresh(tmp_path):
    _step(tmp_path, 2, complete=False)
    (tmp_path / TRACKER).write_text("x")
    assert "training from scratch" in repair_tracker(str(tmp_path))
    assert not os.path.exists(tmp_path / TRACKER)
