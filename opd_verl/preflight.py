"""`python -m opd_verl.preflight --teacher X --student Y`: the trainer's teacher-vs-student preflight on its own.

    python -m opd_verl.preflight --teacher Qwen/Qwen2-7B-Instruct --student Qwen/Qwen2-0.5B-Instruct
        [--teacher-tokenizer T] [--student-tokenizer S] [--allow-template-mismatch] [--trust-remote-code]
        [--teacher-prompt chat_template|TEMPLATE [--no-wrap-chat] [--cross-tokenizer] --data train.parquet]

The same checks as `python -m opd_verl.main_opd` runs before Ray (opd_verl.checks.preflight): the vocabularies
(token -> id) and the chat templates of teacher and student, from their tokenizer files and config.json only (no
weights); local directories or hub names (from the Hugging Face cache, else downloaded). Useful on a login node
before a launch, or where the trainer printed that it skipped them. With a teacher's own view (--teacher-prompt,
--cross-tokenizer: opd.teacher.prompt / cross_tokenizer) the view checks instead: the view rendered on the first
rows of --data, the vocabularies unless --cross-tokenizer, the byte round trip with it.

--teacher-prompt takes the value as opd.teacher.prompt's: one pair of outer quotes, as a Hydra override carries
them (`"'{prompt} ...'"`, pasted from `opd.teacher.prompt='{prompt} ...'`), is removed, as Hydra removes it, and
a line says so.

Exit status: 0 with the "matches" line; 2 with one `opd_verl: error:` line on a mismatch (or a bad path); 3 when a
hub model's files cannot be had here (offline and not cached, hub unreachable, not found), with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.preflight import FilesUnavailable, check_model_path, check_teacher, check_tokenizer_path

EXIT_MISMATCH = 2
EXIT_UNAVAILABLE = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m opd_verl.preflight",
        description="Check that a teacher and a student share a vocabulary and a chat template (tokenizers and "
        "config.json only; local directories or hub names).",
    )
    parser.add_argument("--teacher", required=True, help="teacher model: directory or hub name (opd.teacher.path)")
    parser.add_argument("--student", required=True, help="student model: directory or hub name (actor_rollout_ref.model.path)")
    parser.add_argument("--teacher-tokenizer", help="teacher tokenizer (opd.teacher.tokenizer_path; default: --teacher)")
    parser.add_argument(
        "--student-tokenizer", help="student tokenizer (actor_rollout_ref.model.tokenizer_path; default: --student)"
    )
    parser.add_argument(
        "--allow-template-mismatch",
        action="store_true",
        help="chat templates that render differently are reported, not an error (opd.preflight.allow_template_mismatch)",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="load both tokenizers with trust_remote_code")
    parser.add_argument("--teacher-prompt", default="student",
                        help="the teacher's view (opd.teacher.prompt): student (default), chat_template, a template, or a "
                        "JSON list of {role, content} messages; one pair of outer quotes is removed, as Hydra does")
    parser.add_argument("--no-wrap-chat", action="store_true",
                        help="a template is the teacher's whole prompt (opd.teacher.wrap_chat=false)")
    parser.add_argument("--cross-tokenizer", action="store_true",
                        help="the teacher has its own tokenizer (opd.teacher.cross_tokenizer=true)")
    parser.add_argument("--data", help="train parquet whose first rows the view is rendered on (data.train_files)")
    return parser.parse_args(argv)


def strip_hydra_quotes(value: str) -> tuple[str, bool]:
    """`value` without one pair of matching outer quotes (' or "), as Hydra reads an override; whether it had them."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1], True
    return value, False


def _view_reports(args) -> list[str]:
    """The trainer's view checks (check_teacher_views' option checks, then check_teacher_view on --data's rows)."""
    from opd_verl.checks.teacher_views import template_placeholders
    from opd_verl.checks.teachers import view_mode
    from opd_verl.checks.preflight import check_teacher_view, load_tokenizer, training_rows

    prompt = args.teacher_prompt
    if prompt.startswith("[") and prompt.endswith("]"):  # a list of {role, content} messages, as JSON
        prompt = json.loads(prompt)
    entry = {"path": args.teacher, "prompt": prompt, "wrap_chat": not args.no_wrap_chat,
             "cross_tokenizer": args.cross_tokenizer}
    mode = view_mode(prompt)
    if mode == "template":
        template_placeholders(prompt, "--teacher-prompt")
    if args.cross_tokenizer and mode == "student":
        raise OPDConfigError("--cross-tokenizer needs the teacher's own prompt: set --teacher-prompt chat_template "
                             "or a template")
    rows, why = training_rows({"data": {"train_files": args.data, "prompt_key": "prompt"}})
    reports = [f"preflight: the teacher's view is not rendered: {why} (give --data)"] if why else []
    student_tok = load_tokenizer(args.student_tokenizer or args.student, args.trust_remote_code)
    teacher_tok = load_tokenizer(args.teacher_tokenizer or args.teacher, args.trust_remote_code)
    return reports + check_teacher_view(entry, "opd.teacher", rows, student_tok, teacher_tok, args.student)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.teacher_prompt, quoted = strip_hydra_quotes(args.teacher_prompt)
    if quoted:
        print(f"opd_verl: --teacher-prompt: its outer quotes are removed, as Hydra removes them from "
              f"opd.teacher.prompt=...; the template is {args.teacher_prompt!r}")
    try:
        check_model_path(args.student, "--student")
        check_model_path(args.teacher, "--teacher")
        check_tokenizer_path(args.student_tokenizer, "--student-tokenizer")
        check_tokenizer_path(args.teacher_tokenizer, "--teacher-tokenizer")
        if args.teacher_prompt != "student" or args.cross_tokenizer:
            reports = _view_reports(args)
        else:
            reports = check_teacher(
                args.student,
                args.teacher,
                student_tokenizer=args.student_tokenizer,
                teacher_tokenizer=args.teacher_tokenizer,
                student_trust=args.trust_remote_code,
                teacher_trust=args.trust_remote_code,
                allow_template_mismatch=args.allow_template_mismatch,
                allow_option="--allow-template-mismatch",
            )
    except OPDConfigError as err:
        print(f"opd_verl: error: {err}", file=sys.stderr)
        return EXIT_MISMATCH
    except FilesUnavailable as err:
        print(f"opd_verl: error: preflight could not run: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    for line in reports:
        print(f"opd_verl: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
