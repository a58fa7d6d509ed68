"""The ``data_source`` strings the preprocess scripts write, and the task each one is scored as: the one place
they are defined. The teacher routing (``opd.teachers[*].data_source``) must use the same strings. Where verl's
default reward knows a data set, the same string is used so verl's default scorer also applies."""

from __future__ import annotations

GSM8K = "openai/gsm8k"
DEEPMATH = "zwhe99/DeepMath-103K"
OPENTHOUGHTS3 = "open-thoughts/OpenThoughts3-1.2M"
AIME2024 = "aime2024"
MATH500 = "HuggingFaceH4/MATH-500"
HUMANEVAL = "openai/openai_humaneval"
MBPP = "google-research-datasets/mbpp"
KODCODE = "KodCode/KodCode-V1"
IFEVAL = "google/IFEval"

#: preprocess script name -> the data_source string its rows carry.
DATA_SOURCES: dict[str, str] = {
    "gsm8k": GSM8K,
    "deepmath": DEEPMATH,
    "openthoughts3": OPENTHOUGHTS3,
    "aime2024": AIME2024,
    "math500": MATH500,
    "humaneval": HUMANEVAL,
    "mbpp": MBPP,
    "kodcode": KODCODE,
    "ifeval": IFEVAL,
}

#: data_source -> answer style of the math sets ("gsm8k": ``####`` answers, "boxed": ``\boxed{}`` answers).
ANSWER_STYLE: dict[str, str] = {
    GSM8K: "gsm8k",
    DEEPMATH: "boxed",
    OPENTHOUGHTS3: "boxed",
    AIME2024: "boxed",
    MATH500: "boxed",
}

#: The instruction appended to every math prompt, per answer style; the math checkers read exactly this format.
INSTRUCTIONS: dict[str, str] = {
    "gsm8k": 'Let\'s think step by step and output the final answer after "####".',
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
}

#: data_source -> the reward that scores it ("math", "code" or "ifeval").
TASKS: dict[str, str] = {
    **{source: "math" for source in ANSWER_STYLE},
    HUMANEVAL: "code",
    MBPP: "code",
    KODCODE: "code",
    IFEVAL: "ifeval",
}

#: Lower-case name fragments that route an unlisted data_source to a task (any other source is scored as math).
_TASK_HINTS = (("humaneval", "code"), ("mbpp", "code"), ("kodcode", "code"), ("ifeval", "ifeval"))


def task_of(data_source: str) -> str:
    """"math", "code" or "ifeval": the reward of a data_source (listed, else by name, else math)."""
    if data_source in TASKS:
        return TASKS[data_source]
    name = str(data_source or "").lower()
    for hint, task in _TASK_HINTS:
        if hint in name:
            return task
    return "math"
