"""Cross-tokenizer alignment (opd_verl.algorithms.token_alignment): per-token bytes of real tiny tokenizers trained
here, the shortest common spans against a brute-force enumeration of all pairs of groupings, and the span terms
(sequence log-ratio kept; one tokenizer on both sides = the direct path's q_t − s_t)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tiny_tokenizers import CORPUS, byte_level_bpe, sentencepiece_unigram, wordpiece

from opd_verl.algorithms.advantages import opd_token_advantage
from opd_verl.algorithms.token_alignment import (
    TokenBytes,
    align_spans,
    batch_token_bytes,
    first_difference,
    span_teacher_logprobs,
    span_terms,
    teacher_response_ids,
    token_byte_spans,
    token_table,
)
from opd_verl.algorithms.token_alignment.token_table import _byte_decoder

TEXTS = [
    "the cat sat on the mat 12345",
    "héllo wörld: naïve café, 日本語 and 🙂🚀",
    "Question: what is 23 + 19?\nAnswer: 42 #### 42",
    "a",
    "unseen: ☃ Ω ж ק",
]


@pytest.fixture(scope="module")
def bpe_a():
    return byte_level_bpe(400, name="tiny-bpe-a")


@pytest.fixture(scope="module")
def bpe_b():
    return byte_level_bpe(300, corpus=list(reversed(CORPUS)) + ["the cat the cat 123 45"], name="tiny-bpe-b")


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_unigram()


# ----------------------------------------------------------------------------------------------- brute force


def _groupings(n: int):
    """Every way to cut n tokens into contiguous non-empty groups, as lists of ranges."""
    for cuts in itertools.product([False, True], repeat=max(n - 1, 0)):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        yield [range(a, b) for a, b in itertools.pairwise(bounds)]


def brute_force_spans(s_pieces: list[bytes], t_pieces: list[bytes]) -> list[tuple[range, range]]:
    """Among all pairs of groupings with the same number of groups whose k-th groups have equal bytes, the one with
    the most groups (the shortest spans); asserts it is unique."""
    best, count = None, 0
    for gs in _groupings(len(s_pieces)):
        for gt in _groupings(len(t_pieces)):
            if len(gs) != len(gt):
                continue
            if all(b"".join(s_pieces[i] for i in a) == b"".join(t_pieces[j] for j in b) for a, b in zip(gs, gt)):
                if best is None or len(gs) > len(best):
                    best, count = list(zip(gs, gt)), 1
                elif len(gs) == len(best):
                    count += 1
    assert count == 1, "the finest common grouping must be unique for tokens of non-zero length"
    return best


def two_pointer_spans(s_pieces: list[bytes], t_pieces: list[bytes]) -> list[tuple[range, range]]:
    """The classic merge walk (for sequences too long to enumerate; checked against brute force below): advance the
    side that is behind in bytes until both have consumed the same bytes; that closes a span."""
    spans, i, j, a, b = [], 0, 0, 0, 0
    si = ti = 0
    while i < len(s_pieces) or j < len(t_pieces):
        if a <= b and i < len(s_pieces):
            a += len(s_pieces[i])
            i += 1
        else:
            b += len(t_pieces[j])
            j += 1
        if a == b and (i == len(s_pieces) or s_pieces[i]) and (j == len(t_pieces) or t_pieces[j]):
            spans.append((range(si, i), range(ti, j)))
            si, ti = i, j
    return spans


def _random_cuts(data: bytes, rng: random.Random, max_tokens: int) -> list[bytes]:
    k = rng.randint(1, min(max_tokens, len(data)))
    cuts = sorted(rng.sample(range(1, len(data)), k - 1))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


# ----------------------------------------------------------------------------------------------- per-token bytes


def test_byte_decoder_is_the_inverse_of_gpt2s_map():
    from opd_verl.demo.tiny_models import _bytes_to_unicode

    forward = _bytes_to_unicode()
    assert _byte_decoder() == {ch: b for b, ch in forward.items()}


@pytest.mark.parametrize("which", ["bpe_a", "sp"])
def test_token_bytes_reproduce_the_text_and_each_token(which, request):
    tok = request.getfixturevalue(which)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        tb = token_byte_spans(tok, ids + [tok.eos_token_id])
        assert tb.ids == ids + [tok.eos_token_id]
        assert tb.special == [False] * len(ids) + [True]
        assert tb.pieces[-1] == tok.eos_token.encode()
        assert b"".join(tb.pieces[:-1]) == text.encode("utf-8")  # the texts round-trip in both tokenizers
        assert tb.offsets()[-1] == (len(text.encode()), len(tb.text))
        for i, piece in zip(ids, tb.pieces):  # a token that decodes to whole characters on its own: those bytes
            alone = tok.decode([i])
            if "\ufffd" not in alone and piece:
                assert piece in (alone.encode(), b" " + alone.encode())  # SentencePiece's first '▁' is a space


def test_byte_level_tokens_split_inside_a_character(bpe_a):
    # 'ж' (d0 b6) never occurs in the corpus: byte-level BPE spells it with one token per byte
    ids = bpe_a.encode("ж", add_special_tokens=False)
    assert token_byte_spans(bpe_a, ids).pieces == [b"\xd0", b"\xb6"]
    # a sequence cut inside a character compares as decode does (U+FFFD)
    assert token_byte_spans(bpe_a, ids[:1]).pieces == [b"\xd0"]


def test_sentencepiece_byte_fallback_and_dummy_prefix(sp):
    ids = sp.encode("☃", add_special_tokens=False)
    tokens = sp.convert_ids_to_tokens(ids)
    assert tokens[0] == "\u2581" and all(t.startswith("<0x") for t in tokens[1:])
    tb = token_byte_spans(sp, ids)
    assert tb.pieces == [b"", b"\xe2", b"\x98", b"\x83"]  # the dummy prefix is dropped, as decode drops it
    assert token_table(sp).kind == "sentencepiece"


def test_fallback_tokenizer_by_incremental_decode():
    wp = wordpiece()
    assert token_table(wp).kind == "decode"
    for text in ["the cat sat", "12345 + 678 = 13023", "héllo wörld"]:
        ids = wp.encode(text, add_special_tokens=False)
        tb = token_byte_spans(wp, ids)
        assert tb.text == wp.decode(ids).encode()
        assert all(p for p in tb.pieces)


def test_table_is_cached_and_follows_added_tokens():
    tok = byte_level_bpe(300, name="tiny-bpe-added")
    first = token_table(tok)
    assert token_table(tok) is first
    tok.add_tokens(["<think>"])
    assert len(token_table(tok).pieces) == len(first.pieces) + 1
    assert token_byte_spans(tok, tok.encode("<think>x", add_special_tokens=False)).pieces == [b"<think>", b"x"]


def test_tokens_that_do_not_reproduce_the_decode_name_the_tokenizer():
    from tokenizers import decoders

    tok = byte_level_bpe(300, name="tiny-bpe-odd-decoder")
    tok.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("a", "A")])
    ids = tok.encode("the cat", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"tokenizer tiny-bpe-odd-decoder \(byte_level\).*sequence 0: first "
                                         r"difference at byte 5: tokens b'at' vs decode b'At'"):
        token_byte_spans(tok, ids)
    assert token_byte_spans(tok, ids, verify=False).text == b"the cat"
    with pytest.raises(ValueError, match="id 100000 outside its vocabulary of 300"):
        token_byte_spans(tok, [100000])


def test_first_difference():
    assert first_difference(b"abc", b"abc") is None
    assert first_difference(b"abc", b"abd") == 2
    assert first_difference(b"ab", b"abc") == 2
    assert first_difference(b"", b"x") == 0


# ----------------------------------------------------------------------------------------------- spans


HAND_MADE = [
    # digits split differently: 1|2345 vs 123|45 -> one span
    ([b"1", b"2345"], [b"123", b"45"]),
    # a merge across a word boundary: " the cat" as one token vs three
    ([b" the cat", b"!"], [b" the", b" c", b"at", b"!"]),
    # multi-byte UTF-8 split differently on each side: 日 = e6 97 a5, 本 = e6 9c ac
    ([b"\xe6\x97", b"\xa5\xe6\x9c\xac", b" x"], [b"\xe6", b"\x97\xa5", b"\xe6\x9c\xac", b" ", b"x"]),
    # é (c3 a9) as bytes vs whole, then agreeing tokens
    ([b"caf\xc3", b"\xa9", b" ok", b"."], [b"caf\xc3\xa9", b" ok", b"."]),
    # one tokenization, two sides
    ([b"a", b"b", b"c"], [b"a", b"b", b"c"]),
]


@pytest.mark.parametrize("s_pieces,t_pieces", HAND_MADE)
def test_hand_made_alignments_match_brute_force(s_pieces, t_pieces):
    assert align_spans(s_pieces, t_pieces) == brute_force_spans(s_pieces, t_pieces)


def test_hand_made_expected_spans():
    assert align_spans(*HAND_MADE[0]) == [(range(0, 2), range(0, 2))]
    assert align_spans(*HAND_MADE[1]) == [(range(0, 1), range(0, 3)), (range(1, 2), range(3, 4))]
    assert align_spans(*HAND_MADE[2]) == [(range(0, 2), range(0, 3)), (range(2, 3), range(3, 5))]
    assert align_spans(*HAND_MADE[3]) == [(range(0, 2), range(0, 1)), (range(2, 3), range(1, 2)),
                                          (range(3, 4), range(2, 3))]


def test_random_splits_match_brute_force():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "1", "é", "日", "🙂"]
    for _ in range(150):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))).encode()
        s_pieces, t_pieces = _random_cuts(data, rng, 7), _random_cuts(data, rng, 7)
        expected = brute_force_spans(s_pieces, t_pieces)
        assert align_spans(s_pieces, t_pieces) == expected, (s_pieces, t_pieces)
        assert two_pointer_spans(s_pieces, t_pieces) == expected, (s_pieces, t_pieces)


def test_zero_length_tokens_join_the_span_before_them():
    # SentencePiece's lone '▁' dummy prefix has no bytes: leading ones join the first span, others the one before
    assert align_spans([b"", b"ab", b"", b"c"], [b"a", b"b", b"c", b""]) == [
        (range(0, 3), range(0, 2)), (range(3, 4), range(2, 4))]


def test_different_bytes_raise_or_align_the_agreeing_prefix():
    with pytest.raises(ValueError, match=r"first difference at byte 4: student b'x' vs teacher b'y'"):
        align_spans([b"ab", b"cd", b"x"], [b"a", b"bcd", b"y"])
    assert align_spans([b"ab", b"cd", b"x"], [b"a", b"bcd", b"y"], strict=False) == [(range(0, 2), range(0, 2))]
    # the bytes agree up to "abc", but no boundary of that prefix but 0 is common: no span
    assert align_spans([b"ab", b"cx"], [b"a", b"bcy"], strict=False) == []


# ----------------------------------------------------------------------------------------------- span terms


def _tb(pieces, special=None, ids=None):
    special = special or [False] * len(pieces)
    return TokenBytes(ids or list(range(len(pieces))), list(pieces), special)


def _reference_terms(spans, s, q, assign):
    out = [0.0] * len(s)
    for rs, rt in spans:
        term = sum(q[j] for j in rt) - sum(s[i] for i in rs)
        if assign == "last":
            out[rs[-1]] = term
        else:
            for i in rs:
                out[i] = term / len(rs)
    return out


@pytest.mark.parametrize("assign", ["last", "spread"])
def test_span_terms_against_brute_force_and_the_sequence_log_ratio(assign):
    rng = random.Random(1)
    students, teachers, s_all, q_all, refs = [], [], [], [], []
    for _ in range(40):
        data = "".join(rng.choice(["x", " ", "9", "ü", "日"]) for _ in range(rng.randint(1, 5))).encode()
        sp_, tp_ = _random_cuts(data, rng, 6), _random_cuts(data, rng, 6)
        s = [-rng.random() * 3 for _ in sp_]
        q = [-rng.random() * 3 for _ in tp_]
        students.append(_tb(sp_))
        teachers.append(_tb(tp_))
        s_all.append(torch.tensor(s, dtype=torch.float64))
        q_all.append(torch.tensor(q, dtype=torch.float64))
        refs += _reference_terms(brute_force_spans(sp_, tp_), s, q, assign)
    out = span_terms(students, teachers, s_all, q_all, assign=assign)
    torch.testing.assert_close(out.terms, torch.tensor(refs, dtype=torch.float64), rtol=0, atol=1e-12)
    for b in range(len(students)):  # each response's terms sum to log πt(y) − log πs(y)
        a, e = out.offsets[b], out.offsets[b + 1]
        assert abs(float(out.terms[a:e].sum()) - float(q_all[b].sum() - s_all[b].sum())) < 1e-12
    torch.testing.assert_close(out.teacher_view - torch.cat(s_all), out.terms, rtol=0, atol=1e-12)
    assert out.mask.all() and out.stats.aligned_byte_frac == 1.0
    assert out.stats.num_spans == len(out.span_student_logprob) == int(out.span_last.sum())
    # batched = one sample at a time
    one = torch.cat([span_terms([st], [te], [s], [q], assign=assign).terms
                     for st, te, s, q in zip(students, teachers, s_all, q_all)])
    torch.testing.assert_close(out.terms, one, rtol=0, atol=0)


def test_special_tokens_mapped_or_masked():
    student = [_tb([b"12", b"34", b"<|im_end|>"], [False, False, True], [5, 6, 99])]
    teacher = [_tb([b"1", b"23", b"4", b"</s>"], [False, False, False, True], [1, 2, 3, 77])]
    s, q = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-0.1, -0.2, -0.3, -0.4])

    mapped = span_terms(student, teacher, s, q, special_map={99: 77})
    torch.testing.assert_close(mapped.terms, torch.tensor([0.0, -0.6 + 3.0, -0.4 + 0.5]))
    assert mapped.mask.tolist() == [True, True, True] and mapped.span_ids.tolist() == [0, 0, 1]
    assert mapped.stats.masked_special == 0 and mapped.stats.num_spans == 2

    masked = span_terms(student, teacher, s, q)  # no map: the student's eos is masked, the teacher's </s> ignored
    torch.testing.assert_close(masked.terms, torch.tensor([0.0, 2.4, 0.0]))
    assert masked.mask.tolist() == [True, True, False] and masked.span_ids.tolist() == [0, 0, -1]
    assert masked.stats.masked_special == 1 and masked.stats.span_teacher_tokens == 3
    assert masked.teacher_view[2] == s[2]  # no term: the direct path gives 0 there

    # a special token in the middle: its own span, the text around it aligned on each side of it
    student = [_tb([b"ab", b"<e>", b"c", b"d"], [False, True, False, False], [1, 99, 2, 3])]
    teacher = [_tb([b"a", b"b", b"</s>", b"cd"], [False, False, True, False], [7, 8, 77, 9])]
    out = span_terms(student, teacher, torch.zeros(4), torch.tensor([-1.0, -2.0, -3.0, -4.0]), special_map={99: 77})
    assert out.span_ids.tolist() == [0, 1, 2, 2] and out.terms.tolist() == [-3.0, -3.0, 0.0, -4.0]

    # the teacher's special token elsewhere than the student's: an error naming both, or the agreeing prefix
    teacher = [_tb([b"a", b"</s>", b"b", b"cd"], [False, True, False, False], [7, 77, 8, 9])]
    with pytest.raises(ValueError, match=r"sample 0: special tokens differ: .*\(2, 77\).*\(1, 77\)"):
        span_terms(student, teacher, torch.zeros(4), torch.zeros(4), special_map={99: 77})
    loose = span_terms(student, teacher, torch.zeros(4), torch.zeros(4), special_map={99: 77}, strict=False)
    assert loose.span_ids.tolist() == [-1] * 4 and loose.stats.mismatched_samples == 1
    assert loose.stats.unaligned_tokens == 4 and loose.stats.aligned_bytes == 0


def test_agreeing_prefix_stops_at_the_first_difference_of_text_or_special_tokens():
    # the specials differ at symbol 2 (student's after "ab", teacher's after "abcX"), the text at byte 3 ("d" vs "X"):
    # only "ab" agrees, and the student's special token must not be matched with the teacher's "c"
    student = [_tb([b"ab", b"<e>", b"c", b"d"], [False, True, False, False], [1, 99, 2, 3])]
    teacher = [_tb([b"ab", b"c", b"X", b"</s>"], [False, False, False, True], [7, 8, 9, 77])]
    out = span_terms(student, teacher, torch.zeros(4), torch.zeros(4), special_map={99: 77}, strict=False)
    assert out.span_ids.tolist() == [0, -1, -1, -1] and out.stats.aligned_bytes == 2
    # the text differs first ("aX" vs "ab"), the specials later: only "a"
    student = [_tb([b"a", b"b", b"<e>"], [False, False, True], [1, 2, 99])]
    teacher = [_tb([b"a", b"X", b"</s>"], [False, False, True], [7, 8, 77])]
    out = span_terms(student, teacher, torch.zeros(3), torch.zeros(3), special_map={99: 77}, strict=False)
    assert out.span_ids.tolist() == [0, -1, -1]


def test_mismatched_bytes_name_the_sample_and_count_the_aligned_bytes():
    student = [_tb([b"ok"]), _tb([b"12", b"3x"])]
    teacher = [_tb([b"o", b"k"]), _tb([b"1", b"2", b"3y"])]
    with pytest.raises(ValueError, match=r"sample 1: .*first difference at byte 3: student b'x' vs teacher b'y'"):
        span_terms(student, teacher, torch.zeros(3), torch.zeros(5))
    out = span_terms(student, teacher, torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-0.25] * 5), strict=False)
    assert out.mask.tolist() == [True, True, False]
    assert out.stats.aligned_bytes == 4 and out.stats.total_bytes == 6 and out.stats.mismatched_samples == 1
    assert abs(out.stats.aligned_byte_frac - 4 / 6) < 1e-12 and out.stats.unaligned_tokens == 1
    torch.testing.assert_close(out.terms, torch.tensor([0.5, 0.5, 0.0]))
    metrics = out.stats.metrics()
    assert metrics["student_tokens_per_span"] == 1.0 and metrics["teacher_tokens_per_span"] == 2.0


def test_input_checks():
    with pytest.raises(ValueError, match="assign='first'"):
        span_terms([_tb([b"a"])], [_tb([b"a"])], torch.zeros(1), torch.zeros(1), assign="first")
    with pytest.raises(ValueError, match="teacher_logprobs has 2 log-probs for 1 tokens"):
        span_terms([_tb([b"a"])], [_tb([b"a"])], torch.zeros(1), torch.zeros(2))


# ----------------------------------------------------------------------------------------------- real tokenizers


@pytest.mark.parametrize("which", ["bpe_a", "sp"])
def test_same_tokenizer_gives_the_direct_path(which, request):
    tok = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(0)
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in TEXTS]
    n = sum(map(len, ids))
    s, q = -3 * torch.rand(n, generator=gen), -3 * torch.rand(n, generator=gen)
    out = span_teacher_logprobs(tok, ids, s, tok, ids, q, special_map={tok.eos_token_id: tok.eos_token_id})
    direct = opd_token_advantage(q.view(1, -1), s.view(1, -1), torch.ones(1, n), -1e9, 1e9).token_rewards.view(-1)
    assert (out.terms - direct).abs().max() <= 1e-6
    assert (out.teacher_view - q).abs().max() <= 1e-6
    assert out.stats.num_spans == n and out.stats.student_tokens_per_span == 1.0 and out.mask.all()


def test_repo_character_tokenizer_on_both_sides():
    from opd_verl.demo.tiny_models import build_tokenizer

    tok = build_tokenizer()
    ids = [tok.encode("12 + 30 = 42 #### 42", add_special_tokens=False) + [tok.eos_token_id]]
    s, q = -torch.rand(len(ids[0])), -torch.rand(len(ids[0]))
    out = span_teacher_logprobs(tok, ids, s, tok, ids, q, special_map={tok.eos_token_id: tok.eos_token_id})
    assert (out.terms - (q - s)).abs().max() <= 1e-6


@pytest.mark.parametrize("teacher_name", ["bpe_b", "sp"])
def test_two_trained_tokenizers(bpe_a, teacher_name, request):
    teacher = request.getfixturevalue(teacher_name)
    student_ids = [bpe_a.encode(t, add_special_tokens=False) + [bpe_a.eos_token_id] for t in TEXTS]
    student = batch_token_bytes(bpe_a, student_ids)
    eos = {bpe_a.eos_token_id: teacher.eos_token_id}
    teacher_ids = teacher_response_ids(student, teacher, eos)
    assert all(t[-1] == teacher.eos_token_id for t in teacher_ids)
    assert [teacher.decode(t[:-1]) for t in teacher_ids] == TEXTS
    tb_t = batch_token_bytes(teacher, teacher_ids)
    assert any(len(a.ids) != len(b.ids) for a, b in zip(student, tb_t))  # really different tokenizations

    gen = torch.Generator().manual_seed(1)
    s = [-2 * torch.rand(len(x), generator=gen, dtype=torch.float64) for x in student_ids]
    q = [-2 * torch.rand(len(x), generator=gen, dtype=torch.float64) for x in teacher_ids]
    out = span_teacher_logprobs(bpe_a, student_ids, s, teacher, teacher_ids, q, special_map=eos)
    assert out.stats.aligned_byte_frac == 1.0 and out.stats.masked_special == 0 and out.mask.all()
    assert out.stats.student_tokens_per_span > 1.0 or out.stats.teacher_tokens_per_span > 1.0
    refs = []
    for a, b, sb, qb in zip(student, tb_t, s, q):  # the text part against brute force, eos its own span
        pieces_s, pieces_t = a.pieces[:-1], b.pieces[:-1]
        expected = two_pointer_spans(pieces_s, pieces_t)
        if len(pieces_s) <= 8 and len(pieces_t) <= 8:
            assert expected == brute_force_spans(pieces_s, pieces_t)
        assert align_spans(pieces_s, pieces_t) == expected
        refs.append(torch.tensor(_reference_terms(expected, sb[:-1].tolist(), qb[:-1].tolist(), "last")
                                 + [float(qb[-1] - sb[-1])], dtype=torch.float64))
    torch.testing.assert_close(out.terms, torch.cat(refs), rtol=0, atol=1e-12)

    # without the eos map the student's eos is masked and the teacher gets no eos
    plain = teacher_response_ids(student, teacher)
    assert [teacher.decode(t) for t in plain] == TEXTS
    assert plain == teacher(TEXTS, add_special_tokens=False)["input_ids"]
    out = span_teacher_logprobs(bpe_a, student_ids, s, teacher, plain, [x[:-1] for x in q])
    assert out.stats.masked_special == len(TEXTS) and int((~out.mask).sum()) == len(TEXTS)
