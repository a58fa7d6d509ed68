"""Crash-safe resume on top of verl 0.9.1's checkpoints.

verl writes `global_step_N/` (actor, data.pt, ...) and then `latest_checkpointed_iteration.txt` with a plain
open(..., "w"): a kill inside that write leaves an empty tracker, and resume then crashes. After each save we mark
the folder complete (an atomically written marker); before a resume the tracker is checked and, if it is not
readable or points at a folder that is not there, rewritten atomically to the newest complete folder.

Rotation (trainer.max_actor_ckpt_to_keep etc.) is done here too, not by verl: verl's checkpoint manager deletes the
previous `global_step_M/actor` as soon as the new actor files are written, before data.pt and the tracker, so a
kill in between left a tracker pointing at a folder without its actor. Here old folders go only after the new one
is complete, marker first (a half-deleted folder is never taken for complete).
"""

from __future__ import annotations

import os
import re
import shutil

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = ".opd_verl_complete"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(step_dir: str) -> None:
    """Called after verl has written everything of a checkpoint (tracker included)."""
    _atomic_write(os.path.join(step_dir, COMPLETE_MARKER), "complete\n")


def read_tracker(root: str) -> int | None:
    try:
        with open(os.path.join(root, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def complete_steps(root: str) -> list[int]:
    """Steps whose folder carries the completion marker, ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, COMPLETE_MARKER)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def repair_tracker(root: str) -> str | None:
    """Make the tracker point at a complete checkpoint; returns a message when it changed something."""
    step = read_tracker(root)
    tracker_exists = os.path.exists(os.path.join(root, TRACKER))
    if step is not None and os.path.isdir(os.path.join(root, f"global_step_{step}")):
        return None
    if step is None and not tracker_exists:
        return None  # nothing saved yet (or a fresh run): verl trains from scratch
    complete = complete_steps(root)
    if not complete:
        os.remove(os.path.join(root, TRACKER))
        return f"checkpoint tracker in {root} was unreadable and no complete checkpoint exists: training from scratch"
    _atomic_write(os.path.join(root, TRACKER), str(complete[-1]))
    return f"checkpoint tracker in {root} was unreadable or stale: resuming from complete global_step_{complete[-1]}"


def checkpoints_to_keep(trainer_config) -> int | None:
    """How many checkpoint folders verl's settings keep (None: all). A folder is resumable only with all its parts,
    so the smallest limit set wins."""
    if trainer_config.get("remove_previous_ckpt_in_save", False):
        return 1
    limits = [trainer_config.get(key) for key in ("max_actor_ckpt_to_keep", "max_critic_ckpt_to_keep")]
    limits = [int(n) for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def prune_complete(root: str, keep: int) -> list[int]:
    """Delete the complete checkpoints older than the newest `keep` complete ones (never the tracker's); returns
    their steps. Folders without the marker (not written by opd_verl, or half written) are left alone."""
    tracked = read_tracker(root)
    removed = []
    for step in complete_steps(root)[:-keep]:
        if step == tracked:
            continue
        folder = os.path.join(root, f"global_step_{step}")
        os.remove(os.path.join(folder, COMPLETE_MARKER))
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(step)
    return removed
