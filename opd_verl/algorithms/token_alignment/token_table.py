"""The id -> bytes table of a tokenizer, built once per tokenizer: byte-level BPE (the inverse of GPT-2's
bytes_to_unicode map), SentencePiece ('▁' -> space, <0xNN> -> that byte), or any other tokenizer's decode of each
token; its special ids."""

from __future__ import annotations

import functools
from typing import NamedTuple

SPIECE_UNDERLINE = "\u2581"
KINDS = ("byte_level", "sentencepiece", "decode")


class TokenTable(NamedTuple):
    """id -> bytes of a tokenizer (`token_table`). ``kind``: how the bytes were found (one of KINDS)."""

    name: str
    kind: str
    pieces: tuple[bytes, ...]
    special_ids: frozenset[int]



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
