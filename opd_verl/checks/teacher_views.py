"""Each teacher's view of a sample (opd.teacher.prompt / wrap_chat / cross_tokenizer): its checks against the
chosen mode, and the line main_opd prints for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.modes import LOSS_LEVEL, uses_distill_loss
from opd_verl.checks.teachers import VIEW_DEFAULTS, has_view, teacher_entries, teacher_key, view_mode


def template_placeholders(template: Any, key: str) -> list[list[str]]:
    """The placeholders of a prompt template (a string or a list of {role, content} messages) as field paths, e.g.
    [["prompt"], ["reward_model", "ground_truth"]]; OPDConfigError for a malformed one (one line naming the key)."""
    from opd_verl.algorithms.teacher_view import _field_path, _parse

    if isinstance(template, str):
        contents = [template]
    elif isinstance(template, Sequence) and template and all(
        isinstance(m, Mapping) and set(m) == {"role", "content"} and isinstance(m["content"], str) for m in template
    ):
        contents = [m["content"] for m in template]
    else:
        raise OPDConfigError(
            f"{key}={template!r} is neither student, chat_template, a template string nor a list of "
            "{role, content} messages; set e.g. " + key + "=chat_template"
        )
    paths = []
    try:
        for content in contents:
            paths += [_field_path(piece) for piece, is_field in _parse(content) if is_field]
    except ValueError as err:
        raise OPDConfigError(f"{key}: {str(err).removeprefix('opd_verl: opd.teacher.prompt: ')}; "
                             "write {{ and }} for literal braces") from None
    return paths


def check_teacher_views(config: Mapping) -> None:
    """Each teacher's view (prompt, wrap_chat, cross_tokenizer) on its own and with the chosen mode."""
    opd = config["opd"]
    entries = teacher_entries(opd)
    loss_level = uses_distill_loss(config)
    support = opd["support"]
    several = len(entries) > 1
    for i, entry in enumerate(entries):
        key = teacher_key(opd, i)
        prompt, cross = entry["prompt"], entry["cross_tokenizer"]
        if not isinstance(cross, bool):
            raise OPDConfigError(f"{key}.cross_tokenizer={cross!r} must be true or false")
        if not isinstance(entry["wrap_chat"], bool):
            raise OPDConfigError(f"{key}.wrap_chat={entry['wrap_chat']!r} must be true or false")
        mode = view_mode(prompt)
        if prompt == "template":
            raise OPDConfigError(f"{key}.prompt=template: write the template itself, e.g. "
                                 f"{key}.prompt='{{prompt}} The reference answer is {{reward_model[ground_truth]}}.'")
        if mode == "template":
            template_placeholders(prompt, f"{key}.prompt")
        if not entry["wrap_chat"] and not (mode == "template" and isinstance(prompt, str)):
            raise OPDConfigError(f"{key}.wrap_chat=false has no effect: it is read only with a template string as "
                                 f"{key}.prompt; set one, or drop {key}.wrap_chat (default true)")
        if cross and mode == "student":
            raise OPDConfigError(f"{key}.cross_tokenizer=true needs the teacher's own prompt (the student's prompt ids "
                                 f"are not the teacher's tokens): set {key}.prompt=chat_template or a template")
        if mode == "student" and not cross:
            continue
        what = f"{key}.cross_tokenizer=true" if cross else f"{key}.prompt={prompt!r}"
        mode_name = opd["multi_teacher_mode"]
        unsupported = [  # (when, "<what> with ...: not supported: why; fix")
            (loss_level and support != "sampled",
             f"{LOSS_LEVEL} and opd.support={support}: not supported: the loss-level teacher forward scores the "
             f"student's own tokens; use opd.support=sampled (its teacher log-probs come from the reference pass, "
             f"which has the teacher's view) or algorithm.adv_estimator=opd|opd_hybrid without the loss-level mode"),
            (cross and loss_level and opd["kl_estimator"] == "k3",
             "opd.kl_estimator=k3: not supported: k3's per-token ratio pi_t/pi_s has no meaning for byte-span terms; "
             "set opd.kl_estimator=k1 or k1_baseline"),
            (several and mode_name == "mean_logit",
             "opd.multi_teacher_mode=mean_logit: not supported: the mixture needs every teacher's logits on the same "
             "tokens; set opd.multi_teacher_mode=mean_prob or route"),
            (cross and several and mode_name == "mean_prob",
             "opd.multi_teacher_mode=mean_prob: not supported: mean_prob mixes per-token probabilities, and a "
             "cross-tokenizer teacher gives byte-span terms; set opd.multi_teacher_mode=route"),
        ]
        for when, why in unsupported:
            if when:
                raise OPDConfigError(f"{what} with {why}")
    if opd["preflight"]["allow_template_mismatch"] and entries and all(has_view(e) for e in entries):
        raise OPDConfigError(
            "opd.preflight.allow_template_mismatch=true has no effect: every teacher reads its own view "
            "(opd.teacher.prompt), which the preflight checks instead; drop opd.preflight.allow_template_mismatch"
        )


def view_notes(opd: Mapping) -> list[str]:
    """One line per teacher saying what it reads, defaults included (printed by main_opd before Ray starts)."""
    lines = []
    for i, entry in enumerate(teacher_entries(opd)):
        key, prompt, cross = teacher_key(opd, i), entry["prompt"], entry["cross_tokenizer"]
        mode = view_mode(prompt)
        default = " (default)" if prompt == VIEW_DEFAULTS["prompt"] else ""
        how = {
            "student": "the student's prompt ids",
            "chat_template": "the sample's messages in the teacher's chat template",
            "template": "the template " + ("as the user message of the teacher's chat template"
                                           if entry["wrap_chat"] else "as the teacher's whole prompt (wrap_chat=false)"),
        }[mode]
        tokens = ("cross_tokenizer=true: the student's response re-encoded by the teacher's tokenizer, terms by "
                  "byte spans on each span's last student token, the student's eos matched with the teacher's, its "
                  "other special tokens masked" if cross else
                  "cross_tokenizer=false (default): the student's response ids")
        lines.append(f"{key}.prompt={prompt!r}{default}: {how}; {tokens}")
    return lines
