"""The recipes (`+recipes=NAME`, a Hydra config group) and the check of a command line's recipe overrides.

The recipes ship in the package: opd_verl/config/recipes is the repository's recipes/ folder (a link in the source
tree, copied into a wheel), inside the trainer's primary config directory, so `+recipes=NAME` resolves from any
directory with or without `--config-dir`. A `--config-dir DIR` adds the recipes of DIR/recipes.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path

from opd_verl.checks.errors import OPDConfigError, did_you_mean

RECIPE_GROUP = "recipes"
#: a recipe run by verl's SFT trainer, not by opd_verl.main_opd, says so in its header
SFT_ENTRY_POINT = "# Entry point: verl.trainer.sft_trainer"


def packaged_recipes_dir() -> Path:
    return Path(str(resources.files("opd_verl").joinpath("config", RECIPE_GROUP)))


def available_recipes(config_dirs: list[Path] = ()) -> dict[str, Path]:
    """{name: file} of the packaged recipes and those of each `--config-dir` (which win, as in Hydra)."""
    found = {}
    for folder in [packaged_recipes_dir(), *(Path(d) / RECIPE_GROUP for d in config_dirs)]:
        if folder.is_dir():
            found.update({path.stem: path for path in folder.glob("*.yaml")})
    return dict(sorted(found.items()))


def recipe_summary(path: Path) -> str:
    """The first paragraph of a recipe's header (what it trains), as one line."""
    paragraph = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or (paragraph and not line.strip("# ")):
            break
        if not line.startswith("# @package"):
            paragraph.append(line.lstrip("#").strip())
    return " ".join(p for p in paragraph if p)


def is_sft_recipe(path: Path) -> bool:
    return any(line.startswith(SFT_ENTRY_POINT) for line in path.read_text().splitlines())


def config_dirs(argv: list[str]) -> list[Path]:
    """The directories a command line adds to Hydra's search path: `--config-dir DIR` (`-cd DIR`,
    `--config-dir=DIR`) and the file:// entries of a `hydra.searchpath=[...]` override."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.startswith("hydra.searchpath="):
            dirs += [Path(entry.removeprefix("file://")) for entry in _names(arg.split("=", 1)[1])
                     if entry.startswith("file://")]
    return dirs


_OVERRIDE_KEY = re.compile(r"^([+~]{0,2})([A-Za-z0-9_@./-]+)=(.*)$")


def _names(value: str) -> list[str]:
    """The recipe names of an override's value: NAME, or [NAME,NAME] (Hydra's list of options)."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [name.strip() for name in value.split(",") if name.strip()]


def check_recipe_overrides(argv: list[str]) -> None:
    """Each recipe the command line selects exists and is run by main_opd; a misspelt form of `+recipes=NAME`
    (which Hydra would take for a plain key, or reject with a screenful) is one line naming the fix."""
    recipes = None
    for arg in argv:
        match = _OVERRIDE_KEY.match(arg)
        if not match:
            continue
        prefix, key, value = match.groups()
        group = key.split("@")[0]
        if group != RECIPE_GROUP:
            if "." not in key and difflib.get_close_matches(group.lower(), [RECIPE_GROUP, "recipe"], cutoff=0.8):
                raise OPDConfigError(f"{arg}: '{group}' is not a config group; a recipe is selected with "
                                     f"+{RECIPE_GROUP}={value}")
            continue
        if prefix == "~":
            continue
        if prefix != "+":
            raise OPDConfigError(f"{arg}: a recipe is added to the defaults with a leading +: +{RECIPE_GROUP}={value}")
        recipes = available_recipes(config_dirs(argv)) if recipes is None else recipes
        for name in _names(value):
            if name not in recipes:
                guess = did_you_mean(name.removesuffix(".yaml").split("/")[-1], recipes, f"+{RECIPE_GROUP}=")
                raise OPDConfigError(f"unknown recipe '{name}';{guess} available: {', '.join(recipes)}")
            if is_sft_recipe(recipes[name]):
                raise OPDConfigError(f"recipe {name} trains with verl's SFT trainer (verl.trainer.sft_trainer), not "
                                     f"opd_verl.main_opd; run it with: bash examples/run_recipe.sh {name}")
