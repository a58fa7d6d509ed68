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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

SPIECE_UNDERLINE = "\u2581"
KINDS = ("byte_level", "sentencepiece", "decode")
ASSIGN_MODES = ("last", "spread")


class TokenTable(NamedTuple):
    """id -> bytes of a tokenizer (`token_table`). ``kind``: how the bytes were found (one of KINDS)."""

    name: str
    kind: str
    pieces: tuple[bytes, ...]
    special_ids: frozenset[int]


class TokenBytes(NamedTuple):
    """One tokenization: each token's id, the bytes it contributes to the decoded text, and whether it is a special
    token (eos, <|im_end|>, ...; their bytes are their literal text, as decode(skip_special_tokens=False))."""

    ids: list[int]
    pieces: list[bytes]
    special: list[bool]

    @property
    def text(self) -> bytes:
        return b"".join(self.pieces)

    def offsets(self) -> list[tuple[int, int]]:
        """(start, end) byte offset of each token in `text`."""
        out, pos = [], 0
        for piece in self.pieces:
            out.append((pos, pos + len(piece)))
            pos += len(piece)
        return out


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 for chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(rest)}}


def _tokenizer_kind(tokenizer) -> str:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    state = b""
    if decoder is not None:
        try:
            state = decoder.__getstate__()
        except Exception:  # noqa: BLE001 - an exotic decoder: look at the tokenizer instead
            state = b""
        state = state if isinstance(state, bytes) else str(state).encode()
    if b'"ByteLevel"' in state or (not state and hasattr(tokenizer, "byte_decoder")):
        return "byte_level"
    if any(mark in state for mark in (b'"ByteFallback"', b'"Metaspace"', SPIECE_UNDERLINE.encode())):
        return "sentencepiece"
    if not state and hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    return "decode"


def _byte_level_piece(token: str, dec: dict[str, int]) -> bytes:
    # as the tokenizers library's ByteLevel decoder: a token with a character outside the alphabet (an added token
    # such as "<｜end▁of▁sentence｜>") is its UTF-8
    try:
        return bytes(dec[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece_piece(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace(SPIECE_UNDERLINE, " ").encode("utf-8")


def _special_ids(tokenizer) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return frozenset(ids)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# transformers' fast tokenizers whose decode is their backend's decode (then cleaned up, which we switch off)
_PLAIN_DECODE = {"TokenizersBackend._decode", "PreTrainedTokenizerFast._decode"}


def _batch_decode(tokenizer, lists: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(getattr(type(tokenizer), "_decode", None), "__qualname__", "") in _PLAIN_DECODE:
        return backend.decode_batch(lists, skip_special_tokens=False)
    return tokenizer.batch_decode(lists, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=16)
def _cached_table(tokenizer, size: int) -> TokenTable:
    kind = _tokenizer_kind(tokenizer)
    special = _special_ids(tokenizer)
    if kind == "decode":
        texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        pieces = tuple(t.encode("utf-8") for t in texts)
    else:
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        if kind == "byte_level":
            dec = _byte_decoder()
            pieces = tuple(_byte_level_piece(t, dec) if t is not None else b"" for t in tokens)
        else:
            pieces = tuple(_sentencepiece_piece(t) if t is not None else b"" for t in tokens)
    return TokenTable(tokenizer_name(tokenizer), kind, pieces, special)


def token_table(tokenizer) -> TokenTable:
    """The id -> bytes table of ``tokenizer`` (built once per tokenizer and vocabulary size; cached)."""
    return _cached_table(tokenizer, len(tokenizer))


def first_difference(a: bytes, b: bytes) -> int | None:
    """The first byte offset where ``a`` and ``b`` differ (the shorter one's length if one is a prefix of the other);
    None if they are equal."""
    if a == b:
        return None
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _show(data: bytes, at: int, width: int = 8) -> str:
    return repr(data[at:at + width])


def _incremental_pieces(tokenizer, ids: list[int], name: str) -> list[bytes]:
    pieces, prev = [], b""
    for k in range(1, len(ids) + 1):
        cur = _decode(tokenizer, ids[:k]).encode("utf-8")
        if not cur.startswith(prev):
            raise ValueError(f"opd_verl: tokenizer {name}: its decode is not prefix-stable (decoding token {k - 1} "
                             f"changes earlier text), so its tokens have no bytes of their own")
        pieces.append(cur[len(prev):])
        prev = cur
    return pieces


def _checked_pieces(table: TokenTable, tokenizer, ids: list[int], decoded: str, index: int) -> list[bytes]:
    pieces = list(map(table.pieces.__getitem__, ids))
    joined = b"".join(pieces)
    if joined.decode("utf-8", "replace") == decoded:
        return pieces
    if table.kind == "sentencepiece" and joined[:1] == b" " and joined[1:].decode("utf-8", "replace") == decoded:
        # SentencePiece's dummy prefix: decode drops the leading space of the first token
        first = next(i for i, p in enumerate(pieces) if p)
        pieces[first] = pieces[first][1:]
        return pieces
    if table.kind == "decode":
        return _incremental_pieces(tokenizer, ids, table.name)
    target = decoded.encode("utf-8")
    at = first_difference(joined, target)
    raise ValueError(
        f"opd_verl: tokenizer {table.name} ({table.kind}): the bytes of its tokens do not reproduce its decode of "
        f"sequence {index}: first difference at byte {at}: tokens {_show(joined, at)} vs decode {_show(target, at)}"
    )


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, list):
        return ids
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # tensors, numpy arrays, tuples


def batch_token_bytes(tokenizer, batch_ids: Sequence, verify: bool = True) -> list[TokenBytes]:
    """`token_byte_spans` of each sequence of ``batch_ids`` (one batch_decode for the checks)."""
    table = token_table(tokenizer)
    lists = [_as_id_list(ids) for ids in batch_ids]
    size = len(table.pieces)
    for index, ids in enumerate(lists):
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"opd_verl: tokenizer {table.name}: sequence {index} has id {bad[0]} outside its "
                             f"vocabulary of {size}")
    if verify:
        decoded = _batch_decode(tokenizer, lists)
        pieces = [_checked_pieces(table, tokenizer, ids, text, k) for k, (ids, text) in enumerate(zip(lists, decoded))]
    else:
        pieces = [list(map(table.pieces.__getitem__, ids)) for ids in lists]
    special = table.special_ids
    return [TokenBytes(ids, p, [i in special for i in ids]) for ids, p in zip(lists, pieces)]


def token_byte_spans(tokenizer, ids, verify: bool = True) -> TokenBytes:
    """The bytes each token of ``ids`` contributes to the tokenizer's decoded text (``decode(ids,
    skip_special_tokens=False)``), and which tokens are special. With ``verify`` the bytes are checked against that
    decode (a text with invalid UTF-8, e.g. cut inside a character, compares as decode does: with U+FFFD); a
    mismatch raises a ValueError naming the tokenizer and the first differing byte."""
    return batch_token_bytes(tokenizer, [ids], verify)[0]


# ---------------------------------------------------------------------------------------------------------------
# Alignment


class _FlatAlignment(NamedTuple):
    span_s: Tensor  # [Ns] global span id of each student token, -1 outside every span
    last_s: Tensor  # [Ns] bool: the token ends its span
    span_t: Tensor
    last_t: Tensor
    spans_per_sample: Tensor  # [B]


def _sample_index(offsets: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())


def _ends(lengths: Tensor, offsets: Tensor, sample: Tensor) -> Tensor:
    cum = torch.cumsum(lengths, 0)
    base = torch.cat([cum.new_zeros(1), cum])[offsets[:-1]]
    return cum - base[sample]


def _align_flat(len_s: Tensor, off_s: Tensor, len_t: Tensor, off_t: Tensor, limit: Tensor) -> _FlatAlignment:
    """Shortest common spans of a batch of pairs of tokenizations, given each token's length in symbols (bytes; a
    matched special token is one symbol) and, per sample, how many leading symbols agree on both sides (``limit``).

    A common boundary is an end offset ≤ limit that a token ends at on both sides; its span ends at the LAST token
    ending there (a zero-length token belongs to the span before it; leading ones to the first span). Tokens after
    the last common boundary of their sample are in no span."""
    n_samples = limit.numel()
    seg_s, seg_t = _sample_index(off_s), _sample_index(off_t)
    end_s, end_t = _ends(len_s, off_s, seg_s), _ends(len_t, off_t, seg_t)
    width = int(max(end_s.max() if end_s.numel() else 0, end_t.max() if end_t.numel() else 0)) + 1
    key_s, key_t = seg_s * width + end_s, seg_t * width + end_t

    def candidates(key: Tensor, end: Tensor, seg: Tensor) -> Tensor:
        last = torch.ones_like(key, dtype=torch.bool)
        last[:-1] = key[1:] != key[:-1]
        return last & (end <= limit[seg])

    def found_in(key: Tensor, sorted_keys: Tensor) -> Tensor:  # torch.isin, on sorted keys (much faster)
        if sorted_keys.numel() == 0:
            return torch.zeros_like(key, dtype=torch.bool)
        at = torch.searchsorted(sorted_keys, key).clamp_max(sorted_keys.numel() - 1)
        return sorted_keys[at] == key

    cand_s, cand_t = candidates(key_s, end_s, seg_s), candidates(key_t, end_t, seg_t)
    last_s = cand_s & found_in(key_s, key_t[cand_t])  # keys rise along the batch: key_t[cand_t] is sorted
    last_t = cand_t & found_in(key_t, key_s[cand_s])
    per_sample = torch.zeros(n_samples, dtype=torch.long).index_add_(0, seg_s, last_s.long())
    upto = torch.cumsum(per_sample, 0)

    def span_ids(last: Tensor, seg: Tensor) -> Tensor:
        ids = torch.cumsum(last.long(), 0) - last.long()
        return torch.where(ids < upto[seg], ids, torch.full_like(ids, -1))

    return _FlatAlignment(span_ids(last_s, seg_s), last_s, span_ids(last_t, seg_t), last_t, per_sample)


def _offsets(counts: Sequence[int]) -> Tensor:
    return torch.tensor([0, *counts], dtype=torch.long).cumsum(0)


def align_spans(student_bytes: Sequence[bytes], teacher_bytes: Sequence[bytes],
                strict: bool = True) -> list[tuple[range, range]]:
    """The shortest spans whose boundaries agree in both tokenizations of the same bytes, as ``(student token
    range, teacher token range)``, in order; together they cover every token (zero-length tokens join the span before
    them, leading ones the first span). The bytes must be equal (a ValueError names the first differing byte offset
    and bytes); with ``strict=False`` the spans cover only the longest agreeing prefix that ends on a common
    boundary, and the tokens after it are in no span."""
    s_text, t_text = b"".join(student_bytes), b"".join(teacher_bytes)
    at = first_difference(s_text, t_text)
    if at is not None and strict:
        raise ValueError(f"opd_verl: the two tokenizations are of different bytes: first difference at byte {at}: "
                         f"student {_show(s_text, at)} vs teacher {_show(t_text, at)}")
    limit = torch.tensor([len(s_text) if at is None else at])
    flat = _align_flat(
        torch.tensor([len(p) for p in student_bytes], dtype=torch.long), _offsets([len(student_bytes)]),
        torch.tensor([len(p) for p in teacher_bytes], dtype=torch.long), _offsets([len(teacher_bytes)]), limit,
    )
    s_ends = (torch.nonzero(flat.last_s).flatten() + 1).tolist()
    t_ends = (torch.nonzero(flat.last_t).flatten() + 1).tolist()
    return [(range(a, b), range(c, d)) for a, b, c, d in zip([0, *s_ends], s_ends, [0, *t_ends], t_ends)]


# ---------------------------------------------------------------------------------------------------------------
# Span terms


class AlignmentStats(NamedTuple):
    """Counts over the batch (python ints). Bytes are the student's content bytes (special tokens excluded)."""

    aligned_bytes: int
    total_bytes: int
    num_spans: int
    span_student_tokens: int  # student tokens inside a span (matched specials included)
    span_teacher_tokens: int
    masked_special: int  # student special tokens outside special_map: no term
    unaligned_tokens: int  # other student tokens in no span (after the agreeing prefix, strict=False)
    mismatched_samples: int  # samples whose bytes differ (strict=False)

    @property
    def aligned_byte_frac(self) -> float:
        return self.aligned_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def student_tokens_per_span(self) -> float:
        return self.span_student_tokens / self.num_spans if self.num_spans else 0.0

    @property
    def teacher_tokens_per_span(self) -> float:
        return self.span_teacher_tokens / self.num_spans if self.num_spans else 0.0

    def metrics(self) -> dict[str, float]:
        """What a caller logs (it adds the prefix, e.g. ``opd/cross_tokenizer/``)."""
        return {
            "aligned_byte_frac": self.aligned_byte_frac,
            "student_tokens_per_span": self.student_tokens_per_span,
            "teacher_tokens_per_span": self.teacher_tokens_per_span,
            "masked_special_tokens": float(self.masked_special),
            "unaligned_tokens": float(self.unaligned_tokens),
            "mismatched_samples": float(self.mismatched_samples),
        }


class SpanTerms(NamedTuple):
    """Per student token, packed in sample order (``offsets [B+1]`` delimit the samples).

    terms: the OPD term of the token (see `span_terms`; 0 where ``mask`` is False); teacher_view: s_t + terms_t on
    the mask, s_t elsewhere: a per-student-token "teacher log-prob" with which the direct path (q_t − s_t) gives
    exactly ``terms``; mask: the token is in a span; span_ids: its span (−1: none); span_last: it ends its span.
    span_student_logprob, span_teacher_logprob: s_span and q_span per span (float64)."""

    terms: Tensor
    teacher_view: Tensor
    mask: Tensor
    span_ids: Tensor
    span_last: Tensor
    offsets: Tensor
    span_student_logprob: Tensor
    span_teacher_logprob: Tensor
    stats: AlignmentStats


def _packed(values, counts: list[int], what: str) -> Tensor:
    if isinstance(values, Tensor):
        flat = values.reshape(-1)
    else:
        flat = torch.cat([torch.as_tensor(v).reshape(-1) for v in values]) if len(values) else torch.zeros(0)
    if flat.numel() != sum(counts):
        raise ValueError(f"opd_verl: {what} has {flat.numel()} log-probs for {sum(counts)} tokens")
    return flat


class _Side(NamedTuple):
    keep: Tensor  # bool [N]: the token takes part in the alignment
    lengths: Tensor  # int64 [N]: symbols (content bytes; 1 for a matched special token)
    content_lengths: Tensor  # int64 [N]: bytes of non-special tokens, 0 for special ones
    contents: list[bytes]  # per sample: the bytes of its non-special tokens
    specials: list[list[tuple[int, int]]]  # per sample: (content offset, matched id) of each matched special token


def _true_positions(flags: list[bool]) -> list[int]:
    out, j = [], -1
    while True:
        try:
            j = flags.index(True, j + 1)
        except ValueError:
            return out
        out.append(j)


def _side(tokens: Sequence[TokenBytes], matched) -> _Side:
    """``matched(id)``: the id a special token is matched under (None: the token is left out)."""
    lengths, contents, specials, left_out, special_at = [], [], [], [], []
    for tb in tokens:
        start = len(lengths)
        lengths.extend(map(len, tb.pieces))
        if True not in tb.special:  # the common case: no special token, one join
            contents.append(b"".join(tb.pieces))
            specials.append([])
            continue
        found, pieces, pos, prev = [], [], 0, 0
        for j in _true_positions(tb.special):
            pieces += tb.pieces[prev:j]
            pos += sum(lengths[start + prev:start + j])
            prev = j + 1
            special_at.append(start + j)
            m = matched(tb.ids[j])
            if m is None:
                left_out.append(start + j)
            else:
                found.append((pos, m))
        contents.append(b"".join(pieces + tb.pieces[prev:]))
        specials.append(found)
    content_lengths = torch.tensor(lengths, dtype=torch.long)
    at = torch.tensor(special_at, dtype=torch.long)
    content_lengths[at] = 0
    symbols = content_lengths.clone()
    symbols[at] = 1
    keep = torch.ones(len(lengths), dtype=torch.bool)
    keep[torch.tensor(left_out, dtype=torch.long)] = False
    return _Side(keep, symbols, content_lengths, contents, specials)


def _agreeing_symbols(index: int, s_content: bytes, t_content: bytes, s_spec, t_spec, strict: bool,
                      names: tuple[str, str]) -> int | None:
    """How many leading symbols agree (None: all of them, the texts are equal)."""
    at = first_difference(s_content, t_content)
    k = next((j for j, (a, b) in enumerate(zip(s_spec, t_spec)) if a != b), min(len(s_spec), len(t_spec)))
    if k == len(s_spec) == len(t_spec):
        k = None
    if at is None and k is None:
        return None
    if strict:
        if at is not None and (k is None or at < min(s_spec[k:k + 1] + t_spec[k:k + 1])[0]):
            raise ValueError(
                f"opd_verl: cross-tokenizer alignment, sample {index}: {names[1]}'s tokens of the response are not "
                f"{names[0]}'s bytes: first difference at byte {at}: student {_show(s_content, at)} vs teacher "
                f"{_show(t_content, at)}")
        s_k, t_k = (s_spec[k] if k < len(s_spec) else None), (t_spec[k] if k < len(t_spec) else None)
        raise ValueError(
            f"opd_verl: cross-tokenizer alignment, sample {index}: special tokens differ: student's matched special "
            f"token {k} is (byte, teacher id) {s_k}, the teacher's is {t_k}")
    candidates = []
    if k is not None:
        candidates.append(min(s_spec[k:k + 1] + t_spec[k:k + 1])[0] + k)
    if at is not None:
        agreed = s_spec[:k] if k is not None else s_spec
        candidates.append(at + sum(1 for offset, _ in agreed if offset <= at))
    return min(candidates)


def span_terms(
    student: Sequence[TokenBytes],
    teacher: Sequence[TokenBytes],
    student_logprobs,
    teacher_logprobs,
    special_map: Mapping[int, int] | None = None,
    assign: str = "last",
    strict: bool = True,
    names: tuple[str, str] = ("the student", "the teacher"),
) -> SpanTerms:
    """Teacher log-probs mapped onto the student's tokens by byte spans (a batch of responses).

    ``student[b]`` / ``teacher[b]``: the two tokenizations of response b (`batch_token_bytes`); ``*_logprobs``: each
    token's log-prob under its own model (packed ``[N]`` in sample order, or a list of 1-D tensors).
    ``special_map``: student special id -> teacher special id (e.g. {student eos: teacher eos}).

    Per span k (the shortest spans whose boundaries agree, `align_spans`): s_k = Σ s_t over its student tokens,
    q_k = Σ q_u over its teacher tokens, term_k = q_k − s_k. ``assign="last"``: term_k on the span's last student
    token, 0 on its others; ``"spread"``: term_k / n_k on each of its n_k student tokens. Either way the terms of a
    response sum to log πt(y) − log πs(y) over its spans, so when the spans cover the response, the mean of the
    summed terms is exactly −KL(πs‖πt) of the sequence (the k1 estimator's expectation is kept). "last" also keeps
    causality: term_k depends on every token of span k, and under a reward-to-go (opd.discount=1) each token is
    credited with the terms of the spans it can affect (its own and later ones) and no earlier one, the policy
    gradient of the sequence-level reverse KL with a span as one action; "spread" puts part of term_k before the
    tokens it depends on. With one tokenizer on both sides every span is one token and term_t = q_t − s_t.

    Non-finite teacher log-probs propagate into their span's term (the OPD estimator then treats the span's last
    token as invalid). With ``strict`` the two tokenizations must be of the same bytes (ValueError naming the sample
    and the first differing byte); otherwise spans cover the agreeing prefix and the rest is unaligned."""
    if assign not in ASSIGN_MODES:
        raise ValueError(f"opd_verl: assign={assign!r}; one of {', '.join(ASSIGN_MODES)}")
    if len(student) != len(teacher):
        raise ValueError(f"opd_verl: {len(student)} student tokenizations for {len(teacher)} teacher ones")
    special_map = dict(special_map or {})
    targets = set(special_map.values())
    s_side = _side(student, special_map.get)
    t_side = _side(teacher, lambda i: i if i in targets else None)
    s_counts, t_counts = [len(tb.ids) for tb in student], [len(tb.ids) for tb in teacher]
    s = _packed(student_logprobs, s_counts, "student_logprobs")
    q = _packed(teacher_logprobs, t_counts, "teacher_logprobs")

    limits, mismatched = [], 0
    for b in range(len(student)):
        agree = _agreeing_symbols(b, s_side.contents[b], t_side.contents[b], s_side.specials[b], t_side.specials[b],
                                  strict, names)
        mismatched += agree is not None
        limits.append(len(s_side.contents[b]) + len(s_side.specials[b]) if agree is None else agree)

    # align the kept tokens only (a left-out special token must not end a span), then scatter back
    s_off_all, t_off_all = _offsets(s_counts), _offsets(t_counts)
    s_keep_idx, t_keep_idx = torch.nonzero(s_side.keep).flatten(), torch.nonzero(t_side.keep).flatten()
    seg_s_all, seg_t_all = _sample_index(s_off_all), _sample_index(t_off_all)
    s_kept_counts = torch.zeros(len(student), dtype=torch.long).index_add_(0, seg_s_all, s_side.keep.long())
    t_kept_counts = torch.zeros(len(teacher), dtype=torch.long).index_add_(0, seg_t_all, t_side.keep.long())
    flat = _align_flat(
        s_side.lengths[s_keep_idx], _offsets(s_kept_counts.tolist()), t_side.lengths[t_keep_idx],
        _offsets(t_kept_counts.tolist()), torch.tensor(limits, dtype=torch.long),
    )
    n_s = s.numel()
    span_ids = torch.full((n_s,), -1, dtype=torch.long).index_copy_(0, s_keep_idx, flat.span_s)
    span_last = torch.zeros(n_s, dtype=torch.bool).index_copy_(0, s_keep_idx, flat.last_s)
    t_span = torch.full((q.numel(),), -1, dtype=torch.long).index_copy_(0, t_keep_idx, flat.span_t)

    num_spans = int(flat.spans_per_sample.sum())
    mask, t_in = span_ids >= 0, t_span >= 0
    s64, q64 = s.detach().to(torch.float64), q.detach().to(torch.float64)
    s_span = torch.zeros(num_spans, dtype=torch.float64).index_add_(0, span_ids[mask], s64[mask])
    q_span = torch.zeros(num_spans, dtype=torch.float64).index_add_(0, t_span[t_in], q64[t_in])
    term = q_span - s_span
    out_dtype = torch.promote_types(s.dtype, torch.float32)
    terms = torch.zeros(n_s, dtype=torch.float64)
    if assign == "last":
        terms[span_last] = term[span_ids[span_last]]
    else:
        per_span = torch.zeros(num_spans, dtype=torch.float64).index_add_(0, span_ids[mask], torch.ones_like(s64[mask]))
        terms[mask] = term[span_ids[mask]] / per_span[span_ids[mask]]
    teacher_view = torch.where(mask, s64 + terms, s64)

    stats = AlignmentStats(
        aligned_bytes=int(s_side.content_lengths[mask].sum()),
        total_bytes=int(s_side.content_lengths.sum()),
        num_spans=num_spans,
        span_student_tokens=int(mask.sum()),
        span_teacher_tokens=int(t_in.sum()),
        masked_special=int((~s_side.keep).sum()),
        unaligned_tokens=int((s_side.keep & ~mask).sum()),
        mismatched_samples=mismatched,
    )
    return SpanTerms(terms.to(out_dtype), teacher_view.to(out_dtype), mask, span_ids, span_last, s_off_all, s_span,
                     q_span, stats)


def span_teacher_logprobs(
    student_tokenizer, student_ids: Sequence, student_logprobs, teacher_tokenizer, teacher_ids: Sequence,
    teacher_logprobs, special_map: Mapping[int, int] | None = None, assign: str = "last", strict: bool = True,
    verify: bool = True,
) -> SpanTerms:
    """`span_terms` of token ids: each side's bytes from its tokenizer (`batch_token_bytes`)."""
    names = (f"the student's tokenizer {tokenizer_name(student_tokenizer)}",
             f"the teacher's tokenizer {tokenizer_name(teacher_tokenizer)}")
    return span_terms(
        batch_token_bytes(student_tokenizer, student_ids, verify),
        batch_token_bytes(teacher_tokenizer, teacher_ids, verify),
        student_logprobs, teacher_logprobs, special_map=special_map, assign=assign, strict=strict, names=names,
    )


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
