"""The span terms of OPD: per agreeing span the teacher's and the student's summed log-probs, the term q_span −
s_span placed on the span's student tokens; special tokens matched by ``special_map`` or masked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from opd_verl.algorithms.token_alignment.spans import _align_flat, _offsets, _sample_index
from opd_verl.algorithms.token_alignment.token_bytes import TokenBytes, _show, batch_token_bytes, first_difference
from opd_verl.algorithms.token_alignment.token_table import tokenizer_name

ASSIGN_MODES = ("last", "spread")


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
