"""mkdocs hooks: the site is docs/ plus two pages from elsewhere in the repository, README.md (the home page) and
bench/README.md, and the markdown keeps the links that work on GitHub (repository-relative paths).

Each page's relative links are resolved against the page's place in the repository and mapped to the site: a file
under docs/ to its page, README.md and bench/README.md to theirs, any other existing repository file (an image, a
script) to a copy under repo/. A link to a file that does not exist is left pointing at where it would be, so
mkdocs' link validation reports it (and fails a strict build).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

PAGES_OUTSIDE_DOCS = {"README.md": "index.md", "bench/README.md": "bench.md"}
COPIES = "repo"  # other repository files linked from a page, copied under this folder of the site
LINK = re.compile(r"(!?\[[^\]]*\])\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def _relative(target: str) -> bool:
    """A link into the repository (not a URL, an in-page anchor or a site-absolute path)."""
    return not (re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")))


def _repo(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _docs_prefix(config) -> str:
    return Path(config.docs_dir).resolve().relative_to(_repo(config)).as_posix()


def _outside_fences(markdown: str, edit) -> str:
    """Apply `edit` to the text between fenced code blocks only."""
    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(part if FENCE.match(part) else edit(part) for part in parts)


def _repo_path_of(src_uri: str, config) -> str:
    """Where a site page's source lies in the repository."""
    for repo_path, site_uri in PAGES_OUTSIDE_DOCS.items():
        if src_uri == site_uri:
            return repo_path
    return posixpath.join(_docs_prefix(config), src_uri)


def _site_target(repo_target: str, config) -> str:
    docs = _docs_prefix(config) + "/"
    if repo_target in PAGES_OUTSIDE_DOCS:
        return PAGES_OUTSIDE_DOCS[repo_target]
    if repo_target.startswith(docs):
        return repo_target[len(docs):]
    return posixpath.join(COPIES, repo_target)


def _relative_targets(markdown: str, page_repo_path: str):
    """(match, repo path, anchor) of each relative link outside code fences."""
    found = []

    def collect(text: str) -> str:
        for m in LINK.finditer(text):
            target = m.group(2)
            if not _relative(target):
                continue
            path, _, anchor = target.partition("#")
            found.append((path, anchor))
        return text

    _outside_fences(markdown, collect)
    base = posixpath.dirname(page_repo_path)
    return [(posixpath.normpath(posixpath.join(base, p)), a) for p, a in found]


def on_files(files: Files, config) -> Files:
    repo = _repo(config)
    for repo_path, site_uri in PAGES_OUTSIDE_DOCS.items():
        files.append(File.generated(config, site_uri, abs_src_path=str(repo / repo_path)))
    copied = set()
    for file in list(files):
        if not file.src_uri.endswith(".md"):
            continue
        page_repo_path = _repo_path_of(file.src_uri, config)
        markdown = (repo / page_repo_path).read_text(encoding="utf-8")
        for repo_target, _ in _relative_targets(markdown, page_repo_path):
            site_uri = _site_target(repo_target, config)
            if site_uri.startswith(COPIES + "/") and site_uri not in copied and (repo / repo_target).is_file():
                files.append(File.generated(config, site_uri, abs_src_path=str(repo / repo_target)))
                copied.add(site_uri)
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_repo_path = _repo_path_of(page.file.src_uri, config)
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(text: str) -> str:
        def one(m: re.Match) -> str:
            target = m.group(2)
            if not _relative(target):
                return m.group(0)
            path, hash_, anchor = target.partition("#")
            repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), path))
            site = posixpath.relpath(_site_target(repo_target, config), page_dir or ".")
            return f"{m.group(1)}({site}{hash_}{anchor})"

        return LINK.sub(one, text)

    return _outside_fences(markdown, lambda text: _unescape_table_code(rewrite(text)))


def _unescape_table_code(text: str) -> str:
    """GitHub needs `a\\|b` for a pipe in code in a table cell and shows `a|b`; Python-Markdown keeps pipes inside
    code spans out of the cell split by itself and would show the backslash."""
    def row(line: str) -> str:
        if not line.lstrip().startswith("|"):
            return line
        return re.sub(r"`[^`]*`", lambda m: m.group(0).replace("\\|", "|"), line)

    return "\n".join(row(line) for line in text.split("\n"))
