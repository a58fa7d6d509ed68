"""OpenThoughts3 (open-thoughts/OpenThoughts3-1.2M) -> verl parquet, as OPD prompts or as SFT conversations.

Source columns: conversations (a list of {"from": "human"|"gpt", "value": text}; {"role", "content"} turns are
accepted too); domain ("math", "code", "science"), source and difficulty are optional.
Rows are kept when their domain is in --domain (default: math; "all" keeps every domain; with no domain column
every row is kept); the others are counted as skipped. Math rows get the \\boxed{} instruction after the
question (unless it already asks for \\boxed), so the SFT and OPD prompts are the same text.

--mode opd (default): one prompt row per question for the OPD / RL trainer:
    data_source, prompt [{"role": "user", ...}], ability (the domain, "math" if absent),
    reward_model {"style": "rule", "ground_truth": the last \\boxed{} of the reference solution},
    extra_info {split, index, question, answer, domain, source}.
    A row whose reference solution has no \\boxed{} answer is a bad row.

--mode sft: question + reference solution for verl's SFT trainer (verl.trainer.sft_trainer with
    sft_trainer_engine.yaml, whose MultiTurnSFTDataset reads a chat list from the column named by
    data.messages_key, default "messages"):
    data_source, messages [{"role": "user", ...}, {"role": "assistant", "content": solution}], ability,
    extra_info {split, index, domain, source}.
    Train on it with:
        data.train_files=OUT/train.parquet data.messages_key=messages
    (the solutions are copied as they are, reasoning text included; for chat templates that rewrite
    thinking turns see verl's data.ignore_input_ids_mismatch).

    python data_preprocess/openthoughts3.py --local_dir ~/data/openthoughts3 --max_samples 50000
    python data_preprocess/openthoughts3.py --mode sft --local_dir ~/data/openthoughts3_sft --max_samples 50000
    python data_preprocess/openthoughts3.py --local_dir OUT --local_path ot3.parquet --domain math,science
"""

from __future__ import annotations

import common
from common import BadRow, Skip, get_field, with_instruction

from opd_verl.rewards import OPENTHOUGHTS3, last_boxed_content

NAME = "openthoughts3"
COLUMNS = ("conversations",)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turns(record: dict) -> list[tuple[str, str]]:
    conversations = record.get("conversations")
    if conversations is None:
        raise BadRow("missing field 'conversations'")
    if not isinstance(conversations, list):
        raise BadRow(f"field 'conversations' is a {type(conversations).__name__}, not a list of turns")
    turns = []
    for pos, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise BadRow(f"conversations[{pos}] is not a turn object")
        speaker = get_field(turn, ("from", "role"))
        text = get_field(turn, ("value", "content"))
        role = ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None or not isinstance(text, str):
            raise BadRow(f"conversations[{pos}] lacks a known 'from'/'role' or a text 'value'/'content'")
        turns.append((role, text))
    return turns


def _question_and_solution(record: dict) -> tuple[str, str]:
    turns = _turns(record)
    user = next((i for i, (role, text) in enumerate(turns) if role == "user" and text.strip()), None)
    if user is None:
        raise BadRow("no user ('human') turn in 'conversations'")
    solution = next((text for role, text in turns[user + 1 :] if role == "assistant" and text.strip()), None)
    if solution is None:
        raise BadRow("no assistant ('gpt') turn after the question in 'conversations'")
    return turns[user][1].strip(), solution


def make_convert(mode: str, domains: set[str] | None):
    def convert(record: dict, index: int, split: str) -> dict:
        domain = record.get("domain")
        domain = str(domain).strip().lower() if domain is not None else ""
        if domains is not None and domain and domain not in domains:
            raise Skip(f"domain not in --domain {','.join(sorted(domains))}")
        question, solution = _question_and_solution(record)
        if domain in ("", "math"):
            question = with_instruction(question, "boxed")
        common_info = {"split": split, "index": index, "domain": domain, "source": str(record.get("source") or "")}
        ability = domain or "math"
        if mode == "sft":
            return {
                "data_source": OPENTHOUGHTS3,
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": solution}],
                "ability": ability,
                "extra_info": common_info,
            }
        answer = last_boxed_content(solution)
        if not answer:
            raise BadRow("no \\boxed{} answer in the reference solution")
        return {
            "data_source": OPENTHOUGHTS3,
            "prompt": [{"role": "user", "content": question}],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {**common_info, "question": question, "answer": answer},
        }

    return convert


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "open-thoughts/OpenThoughts3-1.2M", ["train"])
    parser.add_argument(
        "--mode",
        choices=("opd", "sft"),
        default="opd",
        help="opd: prompts + ground truth for the OPD trainer; sft: question + solution `messages` for verl's "
        "SFT trainer, written under ~/data/openthoughts3_sft unless --local_dir (--local_save_dir) is given (default: %(default)s)",
    )
    parser.add_argument(
        "--domain",
        default="math",
        help="comma-separated domains to keep (math, code, science), or 'all' (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.mode == "sft" and not (args.local_dir or args.local_save_dir):
        args.local_dir = f"~/data/{NAME}_sft"  # keep the SFT split apart from the OPD prompts of the same name
    wanted = {d.strip().lower() for d in args.domain.split(",") if d.strip()}
    domains = None if wanted == {"all"} else wanted
    if domains is not None and not domains:
        raise common.PreprocessError("--domain is empty; give domain names such as 'math' or 'all'")
    common.run(args, COLUMNS, make_convert(args.mode, domains))


if __name__ == "__main__":
    common.main_guard(main)
