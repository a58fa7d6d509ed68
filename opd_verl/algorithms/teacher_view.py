"""The teacher's own view of a sample (pure python, no verl import): its prompt, and the cross-tokenizer preflight.

``opd.teacher.prompt`` says how the teacher's prompt is built from a sample (a row of verl's dataset: ``prompt``, the
chat messages, and the other columns, e.g. ``extra_info``, ``reward_model``, ``data_source``):

* ``student``: the student's prompt ids, unchanged (the teacher reads exactly what the student read);
* ``chat_template``: the sample's messages rendered with the teacher's own chat template (add_generation_prompt);
* ``template``: a template with placeholders for the sample's fields, e.g.
  ``"{prompt}\\n(The reference answer is {reward_model[ground_truth]}.)"``: ``{prompt}`` is the content of the user
  message(s) (joined by a blank line), ``{field}`` a column, ``{field[key]}`` / ``{field[0]}`` inside it; ``{{`` and
  ``}}`` are literal braces. The rendered text is the single user message of the teacher's chat template
  (``wrap_chat=True``), or the teacher's whole prompt as it is (``wrap_chat=False``, tokenized with the tokenizer's
  own special tokens, e.g. a BOS). A template may also be a list of messages (``{"role", "content"}``, each content
  a template), rendered with the teacher's chat template: a teacher-only system prompt.

The response the teacher scores is always the student's (its ids, or with another tokenizer its text re-encoded:
`opd_verl.algorithms.token_alignment`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opd_verl.algorithms.token_alignment import (
    batch_token_bytes,
    first_difference,
    teacher_response_ids,
    tokenizer_name,
)

PROMPT_MODES = ("student", "chat_template", "template")
KEY = "opd.teacher.prompt"


def _messages(sample: Mapping) -> list[dict]:
    prompt = sample.get("prompt")
    if prompt is None:
        raise ValueError(f"opd_verl: {KEY}: the sample has no 'prompt' (its chat messages); it has: "
                         f"{', '.join(map(str, sample)) or 'nothing'}")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]  # a list, or the numpy array of dicts a parquet column becomes


def user_text(sample: Mapping) -> str:
    """What ``{prompt}`` stands for: the content of the sample's user message(s), joined by a blank line."""
    return "\n\n".join(str(m["content"]) for m in _messages(sample) if m.get("role") == "user")


def _parse(template: str) -> list[tuple[str, bool]]:
    """(literal text, False) and (field, True) pieces of a template; ``{{``/``}}`` are braces."""
    out, text, i = [], [], 0
    while i < len(template):
        c = template[i]
        if c in "{}" and template[i:i + 2] in ("{{", "}}"):
            text.append(c)
            i += 2
        elif c == "{":
            end = template.find("}", i)
            if end < 0:
                raise ValueError(f"opd_verl: {KEY}: unclosed '{{' at character {i} of the template {template!r}")
            out += [("".join(text), False), (template[i + 1:end], True)]
            text, i = [], end + 1
        elif c == "}":
            raise ValueError(f"opd_verl: {KEY}: single '}}' at character {i} of the template {template!r} "
                             f"(write '}}}}' for a brace)")
        else:
            text.append(c)
            i += 1
    return [*out, ("".join(text), False)]


def _field_path(field: str) -> list[str]:
    name, _, rest = field.partition("[")
    path = [name.strip()]
    while rest:
        key, close, rest = rest.partition("]")
        if not close or (rest and not rest.startswith("[")):
            raise ValueError(f"opd_verl: {KEY}: placeholder {{{field}}} is not of the form {{name}} or "
                             f"{{name[key][...]}}")
        path.append(key.strip().strip("'\""))
        rest = rest[1:]
    if not path[0]:
        raise ValueError(f"opd_verl: {KEY}: empty placeholder {{{field}}}")
    return path


def _keys_of(value) -> str:
    if isinstance(value, Mapping):
        return ", ".join(map(str, value)) or "no keys"
    if hasattr(value, "__len__") and not isinstance(value, str):
        return f"{len(value)} items"
    return f"a {type(value).__name__}"


def _lookup(sample: Mapping, field: str):
    path = _field_path(field)
    if path[0] == "prompt" and len(path) == 1:
        return user_text(sample)
    value, where = sample, "the sample"
    for key in path:
        if isinstance(value, Mapping):
            found = key in value
            nxt = value.get(key) if found else None
        elif isinstance(value, str) or not hasattr(value, "__getitem__"):
            found = False
        else:
            found = key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value)
            nxt = value[int(key)] if found else None
        if not found:
            raise ValueError(f"opd_verl: {KEY}: unknown placeholder {{{field}}}: {where} has no {key!r} "
                             f"(it has: {_keys_of(value)})")
        value, where = nxt, f"{where}[{key!r}]" if where != "the sample" else repr(key)
    return value


def render_template(template: str, sample: Mapping) -> str:
    """The template with each placeholder replaced by the sample's field (see the module's docstring)."""
    return "".join(str(_lookup(sample, piece)) if is_field else piece for piece, is_field in _parse(template))


def _chat(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"opd_verl: {KEY}: the teacher's tokenizer {tokenizer_name(tokenizer)} has no chat "
                         f"template; use {KEY}=student or a template with wrap_chat=False")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def teacher_prompt_text(mode: str, sample: Mapping, tokenizer_teacher, template=None,
                        wrap_chat: bool = True) -> str | None:
    """The teacher's prompt as text (None for ``student``: the student's ids are used as they are)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"opd_verl: {KEY}={mode!r} is not one of {', '.join(PROMPT_MODES)}")
    if mode == "student":
        return None
    if mode == "chat_template":
        return _chat(tokenizer_teacher, _messages(sample))
    if template is None or isinstance(template, str) and not template:
        raise ValueError(f"opd_verl: {KEY}=template needs a template (e.g. \"{{prompt}}\")")
    if isinstance(template, str):
        text = render_template(template, sample)
        return _chat(tokenizer_teacher, [{"role": "user", "content": text}]) if wrap_chat else text
    messages = [{"role": m["role"], "content": render_template(m["content"], sample)} for m in template]
    return _chat(tokenizer_teacher, messages)


def build_teacher_prompt(mode: str, sample: Mapping, student_prompt_ids, tokenizer_teacher, template=None,
                         wrap_chat: bool = True):
    """The teacher's prompt ids for one sample: ``student_prompt_ids`` themselves for ``student``; else
    `teacher_prompt_text` tokenized by the teacher (a chat rendering without added special tokens, as verl tokenizes
    the student's; a raw template with them)."""
    text = teacher_prompt_text(mode, sample, tokenizer_teacher, template, wrap_chat)
    if text is None:
        return student_prompt_ids
    raw = mode == "template" and isinstance(template, str) and not wrap_chat
    return tokenizer_teacher.encode(text, add_special_tokens=raw)


def round_trip_check(student_tok, teacher_tok, texts: Sequence[str]) -> str | None:
    """Preflight of a teacher with another tokenizer: each text as the student would emit it (its encoding, decoded)
    must survive the teacher's encode -> decode byte for byte, else the alignment of that response fails. None if
    all do, else one line: how many do not, and the first one's sample index and differing bytes."""
    student_ids = [student_tok.encode(t, add_special_tokens=False) for t in texts]
    try:
        student = batch_token_bytes(student_tok, student_ids)
        teacher = batch_token_bytes(teacher_tok, teacher_response_ids(student, teacher_tok))
    except ValueError as err:
        return str(err)
    bad = [(i, a.text, b.text) for i, (a, b) in enumerate(zip(student, teacher)) if a.text != b.text]
    if not bad:
        return None
    i, s_text, t_text = bad[0]
    at = first_difference(s_text, t_text)
    return (f"opd_verl: cross-tokenizer check: {len(bad)} of {len(texts)} texts do not survive the teacher's "
            f"tokenizer {tokenizer_name(teacher_tok)} (decode -> encode -> decode, from the student's "
            f"{tokenizer_name(student_tok)}) byte for byte; first: sample {i} at byte {at}: student "
            f"{s_text[at:at + 8]!r} vs teacher {t_text[at:at + 8]!r}")
