"""A teacher with another tokenizer: per-token bytes, byte-offset spans, and the span terms of OPD (pure python and
torch, no verl import).

The student's response (its token ids) is decoded and re-encoded with the teacher's tokenizer
(`teacher_response_ids`); the teacher scores its own tokens; its log-probs are mapped onto the student's tokens
through the bytes each token contributes to the text:

1. `token_byte_spans` / `batch_token_bytes`: the bytes of each token (byte-level BPE: the inverse of GPT-2's
   bytes_to_unicode map; SentencePiece: '▁' -> space, <0xNN> -> that byte; any other tokenizer: its decode of each
   token, else an incremental decode), from an id -> bytes table built once per tokenizer (`token_table`), checked
   against the tokenizer's own decode. Special tokens are marked.
2. `align_spans`: the shortest spans whose boundaries agree in both tokenizations of the same bytes (a boundary is a
   byte offset where a token ends on both sides).
3. `span_terms` / `span_teacher_logprobs`: per span, the teacher's log-prob (sum over its teacher tokens) and the
   student's (sum over its student tokens); the span's term q_span − s_span goes to the span's LAST student token,
   0 to the others (``assign="last"``; ``assign="spread"`` divides it evenly). Why "last": see `span_terms`.

Special tokens are not text: a student special token listed in ``special_map`` (e.g. its EOS -> the teacher's EOS)
is a one-token span of its own, matched with that teacher token; any other student special token is masked (no
term, counted in ``masked_special``); teacher special tokens outside ``special_map``'s values are ignored.

Modules: `token_table` (id -> bytes of a tokenizer), `token_bytes` (a sequence's bytes, checked), `spans` (the
agreeing spans), `terms` (the span terms), `reencode` (`teacher_response_ids`).
"""

from opd_verl.algorithms.token_alignment.reencode import teacher_response_ids
from opd_verl.algorithms.token_alignment.spans import align_spans
from opd_verl.algorithms.token_alignment.terms import (
    ASSIGN_MODES,
    AlignmentStats,
    SpanTerms,
    span_teacher_logprobs,
    span_terms,
)
from opd_verl.algorithms.token_alignment.token_bytes import (
    TokenBytes,
    batch_token_bytes,
    first_difference,
    token_byte_spans,
)
from opd_verl.algorithms.token_alignment.token_table import (
    KINDS,
    SPIECE_UNDERLINE,
    TokenTable,
    token_table,
    tokenizer_name,
)

__all__ = [
    "ASSIGN_MODES",
    "KINDS",
    "SPIECE_UNDERLINE",
    "AlignmentStats",
    "SpanTerms",
    "TokenBytes",
    "TokenTable",
    "align_spans",
    "batch_token_bytes",
    "first_difference",
    "span_teacher_logprobs",
    "span_terms",
    "teacher_response_ids",
    "token_byte_spans",
    "token_table",
    "tokenizer_name",
]
