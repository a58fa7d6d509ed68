"""Crash-safe resume: the tracker is repaired to the newest complete checkpoint (opd_verl.verl_ext.checkpoints)."""

import os

from omegaconf import OmegaConf

from opd_verl.verl_ext.checkpoints import (
    COMPLETE_MARKER,
    TRACKER,
    checkpoints_to_keep,
    complete_steps,
    mark_complete,
    prune_complete,
    read_tracker,
    repair_tracker,
)


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


def test_rotation_keeps_the_newest_complete_and_leaves_other_folders(tmp_path):
    for n in (2, 4, 6):
        _step(tmp_path, n)
    _step(tmp_path, 8, complete=False)  # half written (or written by plain verl): not ours to delete
    (tmp_path / TRACKER).write_text("6")
    assert prune_complete(str(tmp_path), keep=1) == [2, 4]
    assert sorted(p.name for p in tmp_path.glob("global_step_*")) == ["global_step_6", "global_step_8"]
    assert prune_complete(str(tmp_path), keep=1) == []


def test_rotation_never_deletes_the_tracked_checkpoint(tmp_path):
    _step(tmp_path, 2)
    _step(tmp_path, 4)
    (tmp_path / TRACKER).write_text("2")
    assert prune_complete(str(tmp_path), keep=1) == []
    assert complete_steps(str(tmp_path)) == [2, 4]


def test_half_deleted_folder_is_not_complete(tmp_path):
    d = _step(tmp_path, 2)
    (d / COMPLETE_MARKER).unlink()  # rotation removes the marker first, then the folder
    assert complete_steps(str(tmp_path)) == []


def test_checkpoints_to_keep_from_verl_settings():
    keep = lambda **kw: checkpoints_to_keep(OmegaConf.create(kw))  # noqa: E731
    assert keep() is None and keep(max_actor_ckpt_to_keep=None) is None and keep(max_actor_ckpt_to_keep=0) is None
    assert keep(max_actor_ckpt_to_keep=3) == 3
    assert keep(max_actor_ckpt_to_keep=3, max_critic_ckpt_to_keep=2) == 2
    assert keep(remove_previous_ckpt_in_save=True, max_actor_ckpt_to_keep=3) == 1
