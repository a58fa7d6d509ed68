"""Checks of teacher against student before any model loads: paths, vocabularies, chat templates.

Only tokenizers and config.json files are read (never weights): from a local directory, or for a hub name
(`Qwen/Qwen2-7B-Instruct`) through transformers from the Hugging Face cache, else downloaded from the hub.
The checks of a teacher whose files cannot be had are skipped with one line saying why, the fix, and the command
that runs them (`python -m opd_verl.preflight`). Before a launch (not `--cfg job`), after the device check, a name
that is neither a directory here nor in the Hugging Face cache while the hub cannot be reached (offline, or no
connection) is an error (check_model_sources): no model could load it; a hub that answers "not found" / "gated" is
not (the workers may hold a token).
Each failure is one line naming both models and the fix.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Mapping
from typing import Any

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.teachers import has_view, teacher_entries, teacher_key, view_mode

PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30? Answer after ####."},
]
#: what to set to allow templates that render differently, in the trainer's config (the CLI says its flag)
ALLOW_TEMPLATE_MISMATCH = "opd.preflight.allow_template_mismatch=true"
CLI = "python -m opd_verl.preflight"
#: the files that say a hub name's model / tokenizer is in the Hugging Face cache
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def hub_fix(name: str) -> str:
    """What to do where the hub cannot be reached for `name`."""
    return (f"use a local model directory, or fill the Hugging Face cache where the hub can be reached "
            f"(hf download {name}) and set HF_HUB_OFFLINE=1, or set HF_ENDPOINT to a hub mirror")


class FilesUnavailable(Exception):
    """A hub model's tokenizer or config.json cannot be had here; the message is the reason (one line)."""


def _is_local_model_path(path: str) -> bool:
    """A directory on this machine (absolute, relative or existing), as opposed to a hub name like Org/Model."""
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def check_model_path(path: str, key: str) -> None:
    """A local model path must be a readable directory with a config.json (hub names are read by the preflight)."""
    if not _is_local_model_path(path):
        return
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise OPDConfigError(f"{key}={path} does not exist; point it at a model directory (with config.json)")
    if not os.access(os.path.join(path, "config.json"), os.R_OK):
        raise OPDConfigError(f"{key}={path} has no readable config.json; point it at a Hugging Face model directory")


def check_tokenizer_path(path: str | None, key: str) -> None:
    """A local tokenizer path must be a directory."""
    if path and _is_local_model_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise OPDConfigError(f"{key}={path} does not exist; point it at a tokenizer directory")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _hub_status(name: str, filename: str) -> tuple[str, str | None]:
    """("ok", None) when `name` can be fetched from the hub (one HEAD request, no retries); ("refused", why) when the
    hub answers no (not found, gated); ("unreachable", why) when it cannot be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(name, filename))
    except EntryNotFoundError:  # the repository is there (this one file is not): let transformers decide
        return "ok", None
    except GatedRepoError as err:
        return "refused", f"{name} is gated on the hub and this machine has no access ({_first_line(err)})"
    except RepositoryNotFoundError:
        return "refused", f"{name} is not on the hub, or is private and this machine has no token for it"
    except Exception as err:  # noqa: BLE001 - a network error of any kind (httpx, OSError, ...)
        return "unreachable", f"the hub cannot be reached for {name} ({_first_line(err)})"
    return "ok", None


def _in_hub_cache(name: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in filenames)


def _offline_reason(name: str, what: str) -> str:
    from huggingface_hub import constants

    return (f"offline (HF_HUB_OFFLINE=1) and the {what} of {name} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})")


def check_model_source(path: str | None, key: str, tokenizer: bool = False, launch: bool = True) -> None:
    """`path` must be something a model (tokenizer) can be loaded from: a local path (./, /, ~) a model directory;
    for a launch (`launch`), any other name a hub id in the Hugging Face cache or fetchable. A name that is none of
    these is one error naming both readings (a local path that does not exist; a hub id that cannot be fetched) and
    the fix. A hub that answers "not found" or "gated" is left to the preflight (the workers may hold a token)."""
    from huggingface_hub.utils import validate_repo_id

    if not path:
        return
    if _is_local_model_path(path):
        check_tokenizer_path(path, key) if tokenizer else check_model_path(path, key)
        return
    if not launch:  # `--cfg job`: the preflight says why it cannot read the files (a phase may still make them)
        return
    try:
        validate_repo_id(path)
    except ValueError:
        raise OPDConfigError(f"{key}={path} is neither an existing directory (from {os.getcwd()}) nor a valid hub "
                             "id (Org/Name); point it at a model directory or a hub model") from None
    if _in_hub_cache(path, TOKENIZER_FILES if tokenizer else MODEL_FILES):
        return
    what = "tokenizer" if tokenizer else "config.json"
    if _offline():
        why = _offline_reason(path, what)
    else:
        status, why = _hub_status(path, TOKENIZER_FILES[0] if tokenizer else MODEL_FILES[0])
        if status != "unreachable":
            return
    raise OPDConfigError(f"{key}={path} is no directory here (from {os.getcwd()}), and as a hub id it cannot be "
                         f"fetched: {why}; fix the path, or {hub_fix(path)}")


def _from_hub(name: str, what: str, filename: str, load: Callable[[bool], Any]) -> Any:
    """`load(local_files_only)` from the Hugging Face cache, else from the hub (unless offline); FilesUnavailable
    with the reason when neither has the files."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        raise FilesUnavailable(f"{name} is neither a local directory nor a hub name") from None
    try:
        return load(True)  # the cache: no network at all
    except OSError:
        pass
    if _offline():
        raise FilesUnavailable(f"{_offline_reason(name, what)}; {hub_fix(name)}")
    status, reason = _hub_status(name, filename)
    if status == "unreachable":
        raise FilesUnavailable(f"{reason}; {hub_fix(name)}")
    if reason:
        raise FilesUnavailable(reason)
    try:
        return load(False)
    except OSError as err:
        raise FilesUnavailable(f"the {what} of {name} could not be downloaded ({_first_line(err)})") from err


def _vocab_of(config: Mapping) -> int | None:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def model_config(path: str) -> dict | None:
    """The model's config.json (None for a local directory without one); a hub name's config.json only is
    fetched (FilesUnavailable when it cannot be had)."""
    if _is_local_model_path(path):
        config_file = os.path.join(os.path.expanduser(path), "config.json")
        if not os.path.isfile(config_file):
            return None
        with open(config_file) as f:
            return json.load(f)

    def load(local_files_only: bool) -> dict:
        from transformers.utils import cached_file

        with open(cached_file(path, "config.json", local_files_only=local_files_only)) as f:
            return json.load(f)

    return _from_hub(path, "config.json", "config.json", load)


def vocab_size(path: str) -> int | None:
    """vocab_size of the model's config.json (None if it has none)."""
    config = model_config(path)
    return None if config is None else _vocab_of(config)


def load_tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer of a local directory or a hub name (its tokenizer files only; FilesUnavailable if not had)."""
    from transformers import AutoTokenizer

    if _is_local_model_path(path):
        return AutoTokenizer.from_pretrained(os.path.expanduser(path), trust_remote_code=trust_remote_code)
    return _from_hub(
        path,
        "tokenizer",
        "tokenizer_config.json",
        lambda local_files_only: AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        ),
    )


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


def compare_chat_templates(
    student_tok, teacher_tok, student_name: str, teacher_name: str, allow_option: str = ALLOW_TEMPLATE_MISMATCH
) -> str | None:
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
        f"template: set {allow_option} if that is intended"
    )


def preflight_command(
    student: str,
    teacher: str,
    student_tokenizer: str | None = None,
    teacher_tokenizer: str | None = None,
    trust_remote_code: bool = False,
    allow_template_mismatch: bool = False,
    view: Mapping | None = None,
    data: str | None = None,
) -> str:
    """The `python -m opd_verl.preflight ...` line that runs the same checks of one teacher against the student
    (``view``: the teacher entry's prompt / wrap_chat / cross_tokenizer, rendered on ``data``)."""
    args = ["--teacher", teacher, "--student", student]
    if view is not None and has_view(view):
        prompt = view["prompt"] if isinstance(view["prompt"], str) else json.dumps(list(view["prompt"]))
        args += ["--teacher-prompt", prompt] + (["--no-wrap-chat"] if not view["wrap_chat"] else [])
        args += (["--cross-tokenizer"] if view["cross_tokenizer"] else []) + (["--data", data] if data else [])
    args += ["--teacher-tokenizer", teacher_tokenizer] if teacher_tokenizer else []
    args += ["--student-tokenizer", student_tokenizer] if student_tokenizer else []
    args += ["--trust-remote-code"] if trust_remote_code else []
    args += ["--allow-template-mismatch"] if allow_template_mismatch else []
    return " ".join([CLI, *map(shlex.quote, args)])


def check_teacher(
    student: str,
    teacher: str,
    student_tokenizer: str | None = None,
    teacher_tokenizer: str | None = None,
    student_trust: bool = False,
    teacher_trust: bool = False,
    allow_template_mismatch: bool = False,
    support: str = "sampled",
    topk: int | None = None,
    allow_option: str = ALLOW_TEMPLATE_MISMATCH,
    load: Callable[..., Any] | None = None,
) -> list[str]:
    """Vocabulary, chat template and vocabulary size of one teacher against the student. Returns report lines;
    raises OPDConfigError on a mismatch, FilesUnavailable when a hub model's files cannot be had.
    `load(function, *args)` may memoise the loads (run_preflight's does, across teachers)."""
    load = load or (lambda function, *args: function(*args))
    student_tok = load(load_tokenizer, student_tokenizer or student, student_trust)
    teacher_tok = load(load_tokenizer, teacher_tokenizer or teacher, teacher_trust)
    student_v, teacher_v = load(vocab_size, student), load(vocab_size, teacher)
    problem = compare_vocabularies(student_tok, teacher_tok, student, teacher)
    if problem:
        raise OPDConfigError(problem)
    reports = []
    problem = compare_chat_templates(student_tok, teacher_tok, student, teacher, allow_option)
    if problem and not allow_template_mismatch:
        raise OPDConfigError(problem)
    if problem:
        reports.append(f"preflight: chat templates differ (allowed by {allow_option.split('=')[0]})")
    if support == "topk" and topk and teacher_v and int(topk) > teacher_v:
        raise OPDConfigError(
            f"opd.topk={topk} is larger than the vocabulary of teacher {teacher} ({teacher_v}); "
            f"set opd.topk <= {teacher_v} or opd.support=full"
        )
    if student_v and teacher_v and student_v != teacher_v:
        reports.append(
            f"preflight: embedding sizes differ (student {student_v}, teacher {teacher_v}) over the same tokenizer; "
            f"distributions are compared over the first {min(student_v, teacher_v)} ids"
        )
    reports.append(f"preflight: teacher {teacher} matches the student's vocabulary and chat template")
    return reports


#: training rows the view checks render (the first ones of the first train file)
VIEW_SAMPLE_ROWS = 32


def training_rows(config: Mapping, n: int = VIEW_SAMPLE_ROWS) -> tuple[list[dict], str | None]:
    """The first ``n`` rows of the first local train file as dicts, the chat messages under "prompt" (verl's
    data.prompt_key), as verl's dataset hands them to the workers; ([], why) when there is no such file."""
    import pyarrow.parquet as pq

    files = config["data"].get("train_files")
    files = [files] if isinstance(files, str) else list(files or [])
    if not files or "://" in str(files[0]) or not os.path.isfile(os.path.expanduser(str(files[0]))):
        return [], f"no local data.train_files to render ({files[0] if files else 'none set'})"
    try:
        first = next(pq.ParquetFile(os.path.expanduser(str(files[0]))).iter_batches(batch_size=n), None)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types; check_data names the problem after us
        return [], f"{files[0]} cannot be read ({type(err).__name__})"
    if first is None:
        return [], f"{files[0]} has no rows"
    rows = first.to_pylist()[:n]
    prompt_key = config["data"].get("prompt_key", "prompt")
    for row in rows:
        row["prompt"] = row.get(prompt_key)
    return rows, None


#: characters of a rendering the preview shows in full; a longer one shows its start and where it differs
PREVIEW_WIDTH = 120
PREVIEW_CONTEXT = 30


def _differing_span(text: str, other: str) -> tuple[int, int]:
    """[start, end) of `text` that differs from `other`: what lies between their common prefix and common suffix."""
    prefix = next((k for k, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
    limit = min(len(text), len(other)) - prefix
    suffix = next((k for k, (a, b) in enumerate(zip(reversed(text), reversed(other))) if a != b or k >= limit), limit)
    return prefix, len(text) - suffix


def show_rendering(text: str, other: str | None, width: int = PREVIEW_WIDTH, context: int = PREVIEW_CONTEXT) -> str:
    """`text` for a one-line report: whole when short; else its head and the part that differs from `other` (with
    `context` characters around it; its two ends when long), as reprs, "..." for what is left out."""
    if len(text) <= width:
        return repr(text)
    differs = other is not None and other != text
    start, end = _differing_span(text, other) if differs else (len(text), len(text))
    head = (0, min(width // 2, start))
    lo, hi = max(0, start - context), min(len(text), end + context)
    if not differs:  # the head and the tail
        lo = len(text) - width // 2
    spans = [head] + ([(lo, lo + width), (hi - width, hi)] if hi - lo > 2 * width else [(lo, hi)])
    merged = [spans[0]]
    for a, b in spans[1:]:  # adjacent or overlapping spans as one
        merged[-1:] = [(merged[-1][0], max(b, merged[-1][1]))] if a <= merged[-1][1] else [merged[-1], (a, b)]
    shown = " ... ".join(repr(text[a:b]) for a, b in merged)
    return shown + (" ..." if merged[-1][1] < len(text) else "") + f" ({len(text)} characters)"


def check_teacher_view(
    entry: Mapping, key: str, rows: list[dict], student_tok, teacher_tok, student_name: str,
) -> list[str]:
    """A teacher with its own view (opd.teacher.prompt / cross_tokenizer) against the student, on training rows.

    Same tokenizer (cross_tokenizer=false): the vocabularies must agree (the teacher scores the student's response
    ids); the chat templates need not. Every row's teacher prompt is rendered as the option says (a missing chat
    template or an unknown placeholder is an error naming the row); the first rendering is reported beside the
    student's. cross_tokenizer=true: the vocabularies may differ; each row's prompt text and reference answer
    must survive the teacher's tokenizer byte for byte (round_trip_check), and both tokenizers need an eos token."""
    from opd_verl.algorithms.teacher_view import round_trip_check, teacher_prompt_text, user_text

    teacher = entry["path"]
    cross, prompt = entry["cross_tokenizer"], entry["prompt"]
    mode = view_mode(prompt)
    reports = []
    if not cross:
        problem = compare_vocabularies(student_tok, teacher_tok, student_name, teacher)
        if problem:
            raise OPDConfigError(f"{problem} (or set {key}.cross_tokenizer=true for a teacher of another tokenizer)")
    if not rows:
        return reports
    texts = []
    for index, row in enumerate(rows):
        template = prompt if mode == "template" else None
        try:
            text = teacher_prompt_text(mode, row, teacher_tok, template, entry["wrap_chat"])
        except ValueError as err:
            message = str(err).removeprefix("opd_verl: ").replace("opd.teacher.prompt", f"{key}.prompt")
            raise OPDConfigError(f"training row {index}: {message}") from None
        texts.append(text)
    if mode != "student":
        student_text = (student_tok.apply_chat_template(list(rows[0]["prompt"]), add_generation_prompt=True,
                                                        tokenize=False)
                        if getattr(student_tok, "chat_template", None) else None)
        same = student_text is not None and all(
            t == student_tok.apply_chat_template(list(r["prompt"]), add_generation_prompt=True, tokenize=False)
            for t, r in zip(texts, rows)) and not cross
        reports.append(
            f"preflight: teacher {teacher} reads its own prompt ({key}.prompt={prompt!r}); row 0: "
            f"{show_rendering(texts[0], student_text)}"
            + (f", the student's: {show_rendering(student_text, texts[0])}" if student_text else "")
            + ("; it equals the student's on every row checked" if same else "")
        )
    if cross:
        for name, tok in (("student", student_tok), ("teacher", teacher_tok)):
            if getattr(tok, "eos_token_id", None) is None:
                raise OPDConfigError(f"{key}.cross_tokenizer=true: the {name}'s tokenizer has no eos token, so the "
                                     f"student's end of response cannot be matched; give it one (eos_token)")
        answers = [str(r["reward_model"]["ground_truth"]) for r in rows
                   if isinstance(r.get("reward_model"), Mapping) and r["reward_model"].get("ground_truth") is not None]
        problem = round_trip_check(student_tok, teacher_tok, [user_text(r) for r in rows] + answers)
        if problem:
            raise OPDConfigError(f"{problem.removeprefix('opd_verl: ')} ({len(rows)} training prompts and "
                                 f"{len(answers)} answers checked); use a teacher whose tokenizer round-trips the "
                                 f"student's text, or drop {key}.cross_tokenizer")
        same_vocab = compare_vocabularies(student_tok, teacher_tok, student_name, teacher) is None
        reports.append(
            f"preflight: teacher {teacher} ({key}.cross_tokenizer=true) round-trips {len(rows)} training prompts and "
            f"{len(answers)} answers byte for byte; student eos {student_tok.eos_token!r} -> teacher eos "
            f"{teacher_tok.eos_token!r}" + ("; the vocabularies are the same (cross_tokenizer=false would read the "
                                           "student's ids directly)" if same_vocab else "")
        )
    return reports


def model_sources(config: Mapping) -> list[tuple[str | None, str, bool]]:
    """(path, key, is a tokenizer) of the student and of every teacher, with their tokenizer paths."""
    opd, model = config["opd"], config["actor_rollout_ref"]["model"]
    sources = [(model["path"], "actor_rollout_ref.model.path", False),
               (model.get("tokenizer_path"), "actor_rollout_ref.model.tokenizer_path", True)]
    for i, teacher in enumerate(teacher_entries(opd)):
        key = teacher_key(opd, i)
        sources += [(teacher["path"], f"{key}.path", False), (teacher.get("tokenizer_path"), f"{key}.tokenizer_path", True)]
    return sources


def check_model_sources(config: Mapping) -> None:
    """Before a launch (after the device check): every model and tokenizer name can be loaded here (local paths
    first, then hub names; check_model_source)."""
    for launch in (False, True):
        for path, key, tokenizer in model_sources(config):
            check_model_source(path, key, tokenizer=tokenizer, launch=launch)


def run_preflight(config: Mapping) -> list[str]:
    """All checks on a composed config (plain dict). Returns report lines; raises OPDConfigError on failure."""
    opd = config["opd"]
    model = config["actor_rollout_ref"]["model"]
    student_path = model["path"]
    student_tok_path = model.get("tokenizer_path")
    student_trust = bool(model.get("trust_remote_code", False))
    allow = bool(opd["preflight"]["allow_template_mismatch"])
    for path, key, tokenizer in model_sources(config):  # every local path before any comparison
        check_model_source(path, key, tokenizer=tokenizer, launch=False)
    memo: dict[tuple, Any] = {}

    def load(function, *args):  # each tokenizer/config once, across teachers; a FilesUnavailable too
        key = (function.__name__, *args)
        if key not in memo:
            try:
                memo[key] = function(*args)
            except FilesUnavailable as err:
                memo[key] = err
        if isinstance(memo[key], FilesUnavailable):
            raise memo[key]
        return memo[key]

    reports = []
    rows = why_no_rows = None
    for i, teacher in enumerate(teacher_entries(opd)):
        key = teacher_key(opd, i)
        teacher_trust = bool(teacher["model"].get("trust_remote_code", False))  # the teacher's own (opd.teacher.model)
        if has_view(teacher):
            if rows is None:
                rows, why_no_rows = training_rows(config)
                if why_no_rows:
                    reports.append(f"preflight: the teachers' views are not rendered here: {why_no_rows}")
            try:
                reports += check_teacher_view(
                    teacher, key, rows,
                    load(load_tokenizer, student_tok_path or student_path, student_trust),
                    load(load_tokenizer, teacher.get("tokenizer_path") or teacher["path"], teacher_trust),
                    student_path,
                )
            except FilesUnavailable as err:
                files = config["data"].get("train_files")
                command = preflight_command(
                    student_path, teacher["path"], student_tok_path, teacher.get("tokenizer_path"),
                    trust_remote_code=student_trust or teacher_trust, view=teacher,
                    data=str(files if isinstance(files, str) else (list(files or []) or [None])[0]),
                )
                reports.append(f"preflight: the view checks of teacher {teacher['path']} against student "
                               f"{student_path} skipped: {err}; run them where the files can be had: {command}")
            continue
        try:
            reports += check_teacher(
                student_path,
                teacher["path"],
                student_tokenizer=student_tok_path,
                teacher_tokenizer=teacher.get("tokenizer_path"),
                student_trust=student_trust,
                teacher_trust=teacher_trust,
                allow_template_mismatch=allow,
                support=opd["support"],
                topk=opd.get("topk"),
                load=load,
            )
        except FilesUnavailable as err:
            command = preflight_command(
                student_path,
                teacher["path"],
                student_tok_path,
                teacher.get("tokenizer_path"),
                trust_remote_code=student_trust or teacher_trust,
                allow_template_mismatch=allow,
            )
            reports.append(
                f"preflight: vocabulary and chat template checks of teacher {teacher['path']} against student "
                f"{student_path} skipped: {err}; run them where the files can be had: {command}"
            )
    return reports
