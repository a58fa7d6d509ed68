"""The IFEval reward (opd_verl/rewards/ifeval.py): lm-eval's instruction checks, strict and loose, on hand-made
responses (followed, not followed, followed only loosely, empty, malformed rows), through the data_source
dispatch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval.tasks.ifeval.utils", reason="the 'ifeval' extra (lm-eval) is not installed")

from opd_verl.rewards import IFEVAL, INFO_KEYS, compute_score, compute_score_with_info  # noqa: E402
from opd_verl.rewards.ifeval import ifeval_ground_truth, ifeval_score  # noqa: E402


def truth(*instructions: tuple[str, dict], prompt: str = "Write about apples.") -> str:
    return ifeval_ground_truth(prompt, [i for i, _ in instructions], [k for _, k in instructions])


NO_COMMA = ("punctuation:no_comma", {})
LOWER = ("change_case:english_lowercase", {})
TITLE = ("detectable_format:title", {})
WORDS = ("length_constraints:number_words", {"relation": "at least", "num_words": 5})
APPLE = ("keywords:existence", {"keywords": ["apple"]})
END = ("startend:end_checker", {"end_phrase": "Any other questions?"})


def test_followed_and_not_followed():
    row = truth(NO_COMMA, TITLE, WORDS, APPLE, END)
    good = "<<Apples>>\nAn apple a day keeps the doctor away. Any other questions?"
    info = compute_score_with_info(IFEVAL, good, row, {})
    assert tuple(info) == INFO_KEYS
    assert {k: info[k] for k in INFO_KEYS if k.startswith("ifeval_") or k == "score"} == {
        "score": 1.0, "ifeval_prompt_strict": 1, "ifeval_prompt_loose": 1,
        "ifeval_inst_total": 5, "ifeval_inst_strict": 5, "ifeval_inst_loose": 5,
    }
    bad = "Pears, plums. Any other questions?"  # a comma, no title, 5 words, no apple, the end phrase
    result = ifeval_score(bad, row)
    assert result.strict == [False, False, True, False, True]
    assert ifeval_score("Pears, plums!", row).strict == [False] * 5
    assert compute_score(IFEVAL, bad, row) == 0.0


def test_loose_accepts_what_strict_does_not():
    row = truth(LOWER)
    response = "Sure! HERE IS MY ANSWER:\napples are red and sweet."  # upper case only in the first line
    info = compute_score_with_info(IFEVAL, response, row, {})
    assert (info["score"], info["ifeval_prompt_strict"], info["ifeval_prompt_loose"]) == (0.0, 0, 1)
    assert (info["ifeval_inst_strict"], info["ifeval_inst_loose"]) == (0, 1)


def test_repeat_prompt_uses_the_rows_prompt():
    prompt = "Say hi. First repeat the request word for word without change."
    row = truth(("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}), prompt=prompt)
    assert compute_score(IFEVAL, "Say hi. hi!", row) == 1.0
    assert compute_score(IFEVAL, "hi!", row) == 0.0


def test_empty_response_and_malformed_rows_score_zero():
    row = truth(NO_COMMA)
    assert ifeval_score("", row).strict == [False]  # even "no comma" is not followed by nothing
    assert compute_score(IFEVAL, "   ", row) == 0.0
    for bad in ("not json", json.dumps({"prompt": "x"}), None):
        info = compute_score_with_info(IFEVAL, "text", bad, {})
        assert (info["score"], info["ifeval_inst_total"]) == (0.0, 0)


def test_a_check_that_raises_counts_as_not_followed(capsys):
    """number_sentences needs nltk's sentence tokenizer data; where it is missing the check raises."""
    import nltk

    row = truth(("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}))
    result = ifeval_score("One sentence. Two sentences.", row)
    try:
        nltk.data.find("tokenizers/punkt_tab")
        have_punkt = True
    except LookupError:
        have_punkt = False
    if have_punkt:
        assert (result.strict, result.errors) == ([True], 0)
    else:
        assert (result.strict, result.loose, result.errors) == ([False], [False], 1)


NO_DOWNLOAD = """
import nltk
calls = []
nltk.download = lambda *args, **kwargs: calls.append(args)
from opd_verl.rewards.ifeval import _lm_eval
_lm_eval()
print("download calls:", calls)
"""


def test_importing_the_checks_downloads_nothing():
    """lm-eval's import calls nltk.download where punkt_tab is missing; the reward skips that network call."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("nltk's punkt_tab data is installed here: lm-eval has nothing to download")
    except LookupError:
        pass
    proc = subprocess.run([sys.executable, "-c", NO_DOWNLOAD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "download calls: []" in proc.stdout
    assert "nltk's punkt_tab data is missing" in proc.stderr
    assert "python -m nltk.downloader punkt_tab" in proc.stderr
