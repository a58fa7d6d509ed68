"""The docs: the site builds with mkdocs in strict mode (a broken link or anchor fails it), and the commands the docs
quote that can run here do.

A quoted command is run when it sits in a ```bash block of README.md, docs/*.md or bench/README.md, starts with
`python -m opd_verl.` or `python data_preprocess/`, and asks for `--help` or `--cfg job` (blocks that show a command
with placeholders are ```text and are not run). They run from the repository root with this interpreter.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCED_BASH = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def build_site(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )


def test_mkdocs_is_installed():
    found = subprocess.run([sys.executable, "-c", "import mkdocs"], capture_output=True).returncode == 0
    assert found, "mkdocs is missing: install the docs extra (bash examples/setup_cpu.sh --tests)"


def test_the_site_builds_strictly(tmp_path):
    result = build_site(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file(), "README.md is the site's home page"
    assert (tmp_path / "site" / "bench" / "index.html").is_file(), "bench/README.md is a page of the site"


def site_copy(tmp_path: Path) -> Path:
    """The repository's files (the site links into any of them), in a scratch folder."""
    root = tmp_path / "repo"
    skip = shutil.ignore_patterns(".git", ".venv", "site", "__pycache__", "*.py[co]", ".pytest_cache", "opd_demo")
    shutil.copytree(REPO, root, ignore=skip, symlinks=True)
    return root


BREAKS = {
    "an anchor that no heading makes": ("docs/install.md", "[x](recipes.md#no-such-heading)", "no-such-heading"),
    "a page that does not exist": ("docs/install.md", "[x](no-such-page.md)", "no-such-page.md"),
    "an anchor into bench/README.md": ("docs/metrics.md", "[x](../bench/README.md#no-such-table)", "no-such-table"),
    "a repository file that does not exist": ("README.md", "[x](examples/no_such_script.sh)", "no_such_script.sh"),
}


@pytest.mark.parametrize("broken", sorted(BREAKS))
def test_a_broken_link_fails_the_build(tmp_path, broken):
    root = site_copy(tmp_path)
    assert build_site(root, tmp_path / "ok").returncode == 0, "the unmodified copy builds"
    page, link, name = BREAKS[broken]
    with open(root / page, "a", encoding="utf-8") as f:
        f.write(f"\nSee {link}.\n")
    result = build_site(root, tmp_path / "broken")
    assert result.returncode != 0, f"{broken} ({link} in {page}) did not fail the strict build"
    assert name in result.stdout + result.stderr, "the build names the broken link"


def quoted_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every runnable command quoted in a ```bash block."""
    commands = []
    for page in PAGES:
        for block in FENCED_BASH.findall(page.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                runnable = argv[:1] == ["python"] and (
                    argv[1:2] == ["-m"] and argv[2].startswith("opd_verl.") or argv[1].startswith("data_preprocess/")
                )
                asks = "--help" in argv or argv[-2:] == ["--cfg", "job"] or "--cfg" in argv and "job" in argv
                if runnable and asks:
                    commands.append((str(page.relative_to(REPO)), argv))
    return commands


COMMANDS = quoted_commands()


def test_the_docs_quote_runnable_commands():
    kinds = {
        "main_opd --help": [a for _, a in COMMANDS if a[:3] == ["python", "-m", "opd_verl.main_opd"] and "--help" in a],
        "a recipe's --cfg job": [a for _, a in COMMANDS if "--cfg" in a and any(x.startswith("+recipes=") for x in a)],
        "--package opd": [a for _, a in COMMANDS if "--package" in a],
        "preprocessing --help": [a for _, a in COMMANDS if a[1].startswith("data_preprocess/")],
    }
    missing = [kind for kind, found in kinds.items() if not found]
    assert not missing, f"the docs quote no runnable command of these kinds: {missing}"


def flat(tree, prefix=""):
    """{dotted key: leaf} of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@pytest.mark.parametrize("page,argv", COMMANDS, ids=[f"{p}: {shlex.join(a[1:])}" for p, a in COMMANDS])
def test_a_quoted_command_runs(page, argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    quoted = f"{page}: {shlex.join(argv)}"
    assert result.returncode == 0, f"{quoted} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{quoted} printed nothing"
    if argv[:3] == ["python", "-m", "opd_verl.main_opd"] and "--help" in argv:
        usage = [line for line in result.stdout.splitlines() if line.strip().lower().startswith("usage:")]
        assert usage, f"{quoted}: no usage line (Hydra's config dump is not a help)"
    if "--cfg" not in argv:
        return
    printed = yaml.safe_load(result.stdout)
    if "--package" in argv:
        package = argv[argv.index("--package") + 1]
        assert package == "opd" and "teacher" in printed and "trainer" not in printed, (
            f"{quoted}: prints more than the opd section: {sorted(printed)[:10]}"
        )
        return
    recipe = next(a.split("=", 1)[1] for a in argv if a.startswith("+recipes="))
    expected = flat(yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text()))
    got = flat(printed)
    differ = {k: (v, got.get(k, "<missing>")) for k, v in expected.items() if got.get(k, "<missing>") != v}
    assert not differ, f"{quoted}: the printed config is not the recipe's (recipe, printed): {differ}"


def test_the_architecture_page_names_every_module():
    """docs/architecture.md's layout walks the package: every module and folder of opd_verl is named there."""
    page = (REPO / "docs" / "architecture.md").read_text()
    layout = page[page.index("```\nopd_verl/"):]
    package = REPO / "opd_verl"
    names = {p.name for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    names |= {f"{p.name}/" for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    missing = sorted(name for name in names if not re.search(rf"(?<![\w/]){re.escape(name)}", layout))
    assert not missing, f"modules of opd_verl that docs/architecture.md's layout does not name: {missing}"
