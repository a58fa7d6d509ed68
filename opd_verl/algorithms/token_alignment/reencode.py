"""The teacher's tokens of the student's responses: their text re-encoded with the teacher's tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opd_verl.algorithms.token_alignment.token_bytes import TokenBytes


def _batch_encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = getattr(getattr(type(tokenizer), "_encode_plus", None), "__qualname__", "") == "TokenizersBackend._encode_plus"
    if plain and hasattr(backend, "encode_batch_fast"):  # the same ids as tokenizer(texts), without offsets
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def teacher_response_ids(student: Sequence[TokenBytes], teacher_tokenizer,
                         special_map: Mapping[int, int] | None = None) -> list[list[int]]:
    """The teacher's tokens of each student response: its text (the student's non-special bytes, decoded as UTF-8
    with U+FFFD for invalid bytes) encoded by ``teacher_tokenizer`` without added special tokens, piece by piece
    between the student's special tokens; a special token in ``special_map`` becomes the teacher's id, any other is
    dropped. One batched encode call."""
    special_map = dict(special_map or {})
    segments, layout = [], []
    for tb in student:
        plan, chunk = [], []
        for i, piece, sp in zip(tb.ids, tb.pieces, tb.special):
            if not sp:
                chunk.append(piece)
            elif i in special_map:
                plan += [len(segments), -1 - special_map[i]]
                segments.append(b"".join(chunk).decode("utf-8", "replace"))
                chunk = []
        plan.append(len(segments))
        segments.append(b"".join(chunk).decode("utf-8", "replace"))
        layout.append(plan)
    encoded = _batch_encode(teacher_tokenizer, segments) if segments else []
    out = []
    for plan in layout:
        ids = []
        for item in plan:
            if item >= 0:
                ids += encoded[item]
            else:
                ids.append(-1 - item)
        out.append(ids)
    return out
