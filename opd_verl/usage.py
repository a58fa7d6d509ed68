"""`python -m opd_verl.main_opd --help`: usage, the three modes, the packaged recipes, the `opd:` keys (each with the
first sentence of its comment in the packaged opd_trainer.yaml, their one source) and where the docs are."""

from __future__ import annotations

import re
from importlib import resources
from textwrap import shorten

import yaml

from opd_verl.checks.modes import LOSS_LEVEL
from opd_verl.checks.recipes import RECIPE_GROUP, available_recipes, is_sft_recipe, recipe_summary

_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(.*)$")
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.(\s|$)")


def first_sentence(comment: list[str]) -> str:
    text = " ".join(comment)
    end = _SENTENCE_END.search(text)
    return text[: end.start() + 1] if end else text


def option_lines() -> list[tuple[str, str]]:
    """[(`opd.<key>=<default>`, its one-line description)] for every leaf of the `opd:` section, in file order. A key
    without a comment of its own shares the line of the one before it (adv_clip_min, adv_clip_max)."""
    text = resources.files("opd_verl").joinpath("config/opd_trainer.yaml").read_text()
    defaults = yaml.safe_load(text)["opd"]
    rows: list[tuple[list[str], str]] = []  # ([dotted keys], description)
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    comment: list[str] = []
    inherited = ""  # a mapping's comment, for its first leaf without one
    in_opd = False
    for line in text.splitlines():
        if line.strip().startswith("#"):
            comment.append(line.strip().lstrip("#").strip())
            continue
        match = _KEY_LINE.match(line)
        if not match:
            comment = [] if not line.strip() else comment
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3).split("#")[0].strip()
        if indent == 0:
            in_opd, path, comment = key == "opd", [], []
            continue
        if not in_opd:
            continue
        path = [p for p in path if p[0] < indent]
        if not value:  # a mapping: its keys follow
            path.append((indent, key))
            inherited, comment = first_sentence(comment), []
            continue
        dotted = ".".join([p[1] for p in path] + [key])
        if comment or inherited or not rows:
            rows.append(([dotted], first_sentence(comment) if comment else inherited))
        else:
            rows[-1][0].append(dotted)
        comment, inherited = [], ""
    return [(", ".join(f"opd.{k}={_default(defaults, k)}" for k in keys), doc) for keys, doc in rows]


def _default(defaults: dict, dotted: str) -> str:
    value = defaults
    for part in dotted.split("."):
        value = value[part]
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def recipe_lines() -> list[str]:
    lines = []
    for name, path in available_recipes().items():
        sft = " [SFT: runs with verl.trainer.sft_trainer, via examples/run_recipe.sh]" if is_sft_recipe(path) else ""
        lines.append(f"  {name}{sft}\n      {shorten(first_sentence([recipe_summary(path)]), 150)}")
    return lines


def usage_text() -> str:
    options = "\n".join(f"  {keys}\n      {doc}" for keys, doc in option_lines())
    return f"""\
usage: python -m opd_verl.main_opd [+{RECIPE_GROUP}=NAME] [KEY=VALUE ...] [--cfg job [--package opd]]

On-policy distillation (OPD) on verl's PPO trainer: the student samples, a frozen teacher scores its tokens.
Arguments are Hydra overrides of verl's ppo_trainer config plus the `opd:` section below; later ones win.
Every opd.* key is checked before Ray starts: a bad one is a one-line error naming the key and the fix.

Modes (pick one; each needs a teacher: opd.teacher.path=<model directory or hub name>, or opd.teachers):
  algorithm.adv_estimator=opd
      The OPD advantage A_t = clip(q_t - s_t, opd.adv_clip_min, opd.adv_clip_max) (teacher minus student log-prob
      of each sampled token) in verl's PPO loss: pure distillation, no reward needed.
  algorithm.adv_estimator=opd_hybrid
      Advantage-level hybrid: A = A_base - opd.hybrid_alpha * (s - q), A_base from opd.hybrid_base_estimator
      (grpo, rloo, ...): reward plus distillation.
  {LOSS_LEVEL}
      Loss-level distillation: L = opd.lambda_rl * L_pg + opd.lambda_distill * L_distill, with opd.divergence
      (reverse_kl, forward_kl, jsd) over opd.support (sampled, topk, full).

Recipes (+{RECIPE_GROUP}=NAME; they ship with the package, so any directory works):
{chr(10).join(recipe_lines())}

Print instead of run:
  --cfg job                 the composed config after our checks and platform defaults, then exit (no Ray)
  --cfg job --package opd   only the opd: section (any dotted key works: --package algorithm)

Options (the opd: section; its full comments: opd_verl/config/opd_trainer.yaml):
{options}

Examples:
  python -m opd_verl.main_opd +{RECIPE_GROUP}=gsm8k_qwen2_0.5b_reverse_kl --cfg job
  python -m opd_verl.main_opd algorithm.adv_estimator=opd opd.teacher.path=Qwen/Qwen2-7B \\
      actor_rollout_ref.model.path=Qwen/Qwen2-0.5B data.train_files=~/data/gsm8k/train.parquet

Docs (in the repository): README.md, docs/modes.md (which mode, the math), docs/options.md (every opd: key),
docs/recipes.md. Hydra's own flags: --hydra-help.
"""
