"""The bytes each token of a sequence contributes to its decoded text, from the tokenizer's table, checked against
the tokenizer's own decode (an incremental decode where the table cannot say)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from opd_verl.algorithms.token_alignment.token_table import TokenTable, token_table


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


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# transformers' fast tokenizers whose decode is their backend's decode (then cleaned up, which we switch off)
_PLAIN_DECODE = {"TokenizersBackend._decode", "PreTrainedTokenizerFast._decode"}


def _batch_decode(tokenizer, lists: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(getattr(type(tokenizer), "_decode", None), "__qualname__", "") in _PLAIN_DECODE:
        return backend.decode_batch(lists, skip_special_tokens=False)
    return tokenizer.batch_decode(lists, skip_special_tokens=False, clean_up_tokenization_spaces=False)



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
