"""Checks of teacher against student before any model loads: paths, vocabularies, chat templates.

Only tokenizers and config.json files are read. Each failure is one line naming both models and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from opd_verl.checks.options import OPDConfigError, teacher_entries

PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30? Answer after ####."},
]


def _is_local_model_path(path: str) -> bool:
    """A directory on this machine (absolute, relative or existing), as opposed to a hub name like Org/Model."""
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def check_model_path(path: str, key: str) -> None:
    """A local model path must be a readable directory with a config.json (hub names are checked on load)."""
    if not _is_local_model_path(path):
        return
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise OPDConfigError(f"{key}={path} does not exist; point it at a model directory (with config.json)")
    if not os.access(os.path.join(path, "config.json"), os.R_OK):
        raise OPDConfigError(f"{key}={path} has no readable config.json; point it at a Hugging Face model directory")


def _vocab_size(path: str) -> int | None:
    config_file = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        config = json.load(f)
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.expanduser(path), trust_remote_code=trust_remote_code)


def compare_vocabularies(student_tok, teacher_tok, student_name: str, teacher_name: str) -> str | None:
    """None if the token→id maps agree on every student token; else a one-line description of the first clash."""
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    clashes = [(tok, i, teacher_vocab.get(tok)) for tok, i in student_vocab.items() if teacher_vocab.get(tok) != i]
    if not clashes:
        return None
    tok, i, j = sorted(clashes, key=lambda c: c[1])[0]
    return (
        f"teacher {teacher_name} and student {student_name} have different vocabularies "
        f"({len(clashes)} of {len(student_vocab)} student tokens differ, e.g. {tok!r}: student id {i}, teacher id {j}); "
        "use a teacher of the same tokenizer family"
    )


def compare_chat_templates(student_tok, teacher_tok, student_name: str, teacher_name: str) -> str | None:
    """None if both render the probe conversation to the same ids; else a one-line description."""

    def render(tok):
        if not getattr(tok, "chat_template", None):
            return None
        ids = tok.apply_chat_template(PROBE_MESSAGES, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    student_ids, teacher_ids = render(student_tok), render(teacher_tok)
    if student_ids == teacher_ids:
        return None
    first = next((k for k, (a, b) in enumerate(zip(student_ids or [], teacher_ids or [])) if a != b), None)
    return (
        f"chat templates of teacher {teacher_name} and student {student_name} render the same prompt differently "
        f"(first difference at token {first}); the teacher scores the student's prompt as rendered by the student's "
        "template: set opd.preflight.allow_template_mismatch=true if that is intended"
    )


def run_preflight(config: Mapping) -> list[str]:
    """All checks on a composed config (plain dict). Returns report lines; raises OPDConfigError on failure."""
    opd = config["opd"]
    model = config["actor_rollout_ref"]["model"]
    student_path = model["path"]
    student_tok_path = model.get("tokenizer_path") or student_path
    trust = bool(model.get("trust_remote_code", False))
    check_model_path(student_path, "actor_rollout_ref.model.path")
    reports = []
    student_tok = None
    for i, teacher in enumerate(teacher_entries(opd)):
        key = "opd.teacher.path" if not opd.get("teachers") else f"opd.teachers[{i}].path"
        check_model_path(teacher["path"], key)
        if not (_is_local_model_path(teacher["path"]) and _is_local_model_path(student_tok_path)):
            reports.append(f"preflight: {teacher['path']} is not local; vocabulary and template checks are skipped")
            continue
        student_tok = student_tok or _load_tokenizer(student_tok_path, trust)
        teacher_trust = bool(teacher["model"].get("trust_remote_code", False))  # the teacher's own (opd.teacher.model)
        teacher_tok = _load_tokenizer(teacher.get("tokenizer_path") or teacher["path"], teacher_trust)
        problem = compare_vocabularies(student_tok, teacher_tok, student_path, teacher["path"])
        if problem:
            raise OPDConfigError(problem)
        problem = compare_chat_templates(student_tok, teacher_tok, student_path, teacher["path"])
        if problem and not opd["preflight"]["allow_template_mismatch"]:
            raise OPDConfigError(problem)
        if problem:
            reports.append("preflight: chat templates differ (allowed by opd.preflight.allow_template_mismatch)")
        student_v, teacher_v = _vocab_size(student_path), _vocab_size(teacher["path"])
        if opd["support"] == "topk" and teacher_v and int(opd["topk"]) > teacher_v:
            raise OPDConfigError(
                f"opd.topk={opd['topk']} is larger than the vocabulary of teacher {teacher['path']} ({teacher_v}); "
                f"set opd.topk <= {teacher_v} or opd.support=full"
            )
        if student_v and teacher_v and student_v != teacher_v:
            reports.append(
                f"preflight: embedding sizes differ (student {student_v}, teacher {teacher_v}) over the same tokenizer; "
                f"distributions are compared over the first {min(student_v, teacher_v)} ids"
            )
        reports.append(f"preflight: teacher {teacher['path']} matches the student's vocabulary and chat template")
    return reports
