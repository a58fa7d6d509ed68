"""The shortest spans whose boundaries agree in two tokenizations of the same bytes (a boundary: a byte offset where
a token ends on both sides), for one pair (`align_spans`) or a packed batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from opd_verl.algorithms.token_alignment.token_bytes import _show, first_difference


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
