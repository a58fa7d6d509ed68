"""The instruction-following reward: IFEval's verifiable instruction checks, strict and loose, as lm-eval
(lm_eval/tasks/ifeval, the port of Google's reference code that the Open LLM Leaderboard uses) implements them;
nothing is rewritten here. Install it with the ``ifeval`` extra: ``pip install -e ".[ifeval]"``.

An IFEval row's ``reward_model.ground_truth`` is a JSON object (``ifeval_ground_truth`` writes it;
data_preprocess/ifeval.py calls it): ``prompt``, ``instruction_id_list`` and ``kwargs`` (one dict per
instruction), as in google/IFEval. Each instruction is checked on its own by lm-eval's
``test_instruction_following_strict`` / ``_loose`` (loose also accepts the response without its first and/or last
line and without ``*``). Score: 1.0 when every instruction is followed, strict (IFEval's prompt-level strict
accuracy). An instruction whose check raises counts as not followed, and the first such error in a process prints
one line naming it. Two checks (number_sentences, capital_word_frequency) need nltk's ``punkt_tab`` data, which
lm-eval downloads at import; that download is skipped here (``python -m nltk.downloader punkt_tab`` installs it).
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from typing import Any

_warned_data = threading.Event()
_warned_check = threading.Event()


def ifeval_ground_truth(prompt: str, instruction_id_list: list[str], kwargs: list[dict]) -> str:
    """The JSON ground truth of an IFEval row; ``kwargs`` entries that are None are dropped (lm-eval drops them)."""
    clean = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    return json.dumps({"prompt": prompt, "instruction_id_list": list(instruction_id_list), "kwargs": clean})


_import_lock = threading.Lock()


def _lm_eval():
    """lm-eval's IFEval module. Its import downloads nltk's punkt_tab where it is missing; here that download is
    skipped (no network at run time: it could hang an offline node) and one line says what is missing instead."""
    with _import_lock:
        try:
            import nltk

            try:
                nltk.data.find("tokenizers/punkt_tab")
                missing = False
            except LookupError:
                missing = True
            real_download = nltk.download
            if missing:
                nltk.download = lambda *args, **kwargs: False
            try:
                from lm_eval.tasks.ifeval import utils
            finally:
                nltk.download = real_download
        except ImportError as exc:
            raise RuntimeError(
                f"opd_verl.rewards: the IFEval reward needs lm-eval's IFEval checks ({exc}); install them with "
                "pip install -e '.[ifeval]' (the opd_verl 'ifeval' extra)"
            ) from exc
        if missing and not _warned_data.is_set():
            _warned_data.set()
            print("opd_verl.rewards: nltk's punkt_tab data is missing, so IFEval's "
                  "length_constraints:number_sentences and change_case:capital_word_frequency checks fail and "
                  "count as not followed; install it with: python -m nltk.downloader punkt_tab",
                  file=sys.stderr, flush=True)
    return utils


@dataclass(frozen=True)
class IFEvalResult:
    strict: list[bool]  # per instruction
    loose: list[bool]
    errors: int = 0  # instructions whose check raised (counted as not followed)

    def info(self) -> dict[str, float | int]:
        prompt_strict = int(bool(self.strict) and all(self.strict))
        return {
            "score": float(prompt_strict),
            "ifeval_prompt_strict": prompt_strict,
            "ifeval_prompt_loose": int(bool(self.loose) and all(self.loose)),
            "ifeval_inst_total": len(self.strict),
            "ifeval_inst_strict": sum(self.strict),
            "ifeval_inst_loose": sum(self.loose),
        }


def _check(test, example, response: str) -> tuple[bool, Exception | None]:
    try:
        return bool(test(example, response).follow_all_instructions), None
    except Exception as exc:  # noqa: BLE001 - one broken check must not take the trainer down
        return False, exc


def ifeval_score(solution_str: str, ground_truth: Any) -> IFEvalResult:
    """Strict and loose results of each instruction of the row for the response."""
    utils = _lm_eval()
    try:
        truth = json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)
        ids = [str(i) for i in truth["instruction_id_list"]]
        kwargs = list(truth.get("kwargs") or [{} for _ in ids])
        prompt = str(truth.get("prompt") or "")
    except (TypeError, ValueError, KeyError):
        return IFEvalResult([], [])
    response = solution_str if isinstance(solution_str, str) else ""
    strict, loose, errors = [], [], 0
    for key, instruction in enumerate(ids):
        example = utils.InputExample(key=key, instruction_id_list=[instruction], prompt=prompt,
                                     kwargs=[kwargs[key] if key < len(kwargs) else {}])
        s, error = _check(utils.test_instruction_following_strict, example, response)
        lo, error_loose = _check(utils.test_instruction_following_loose, example, response)
        strict.append(s)
        loose.append(lo)
        if error or error_loose:
            errors += 1
            if not _warned_check.is_set():
                _warned_check.set()
                first = str(error or error_loose).strip().splitlines()
                print(f"opd_verl.rewards: the IFEval check of '{instruction}' failed "
                      f"({type(error or error_loose).__name__}: {' '.join(first[:3])[:300]}); counted as not "
                      "followed (this line is printed once per process)", file=sys.stderr, flush=True)
    return IFEvalResult(strict, loose, errors)
