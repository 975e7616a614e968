r"""MkDocs hooks: the README as the front page, CHANGELOG.md as a page, and GitHub's table pipes.

Both files live at the repository root, where GitHub shows them, so neither is copied into docs/.
The hook adds them to the site as generated pages (``index.md`` and ``changelog.md``). Their
link targets are written for GitHub, relative to the root; the hook rewrites them for the site:
``docs/x.md`` becomes ``x.md``, and a link to one of the root pages (``CHANGELOG.md``) becomes a
link to its generated page (``changelog.md``). The strict build then checks every such link like
any other. Any other relative link out of the docs is left as it is, so the strict build fails
on it instead of publishing a dead link.

Every page is written so that it reads right on GitHub too. In a GitHub table, a ``|`` inside a
code span must be escaped (`` `\|w\|` ``), while Python-Markdown keeps the backslash; the hook
removes those backslashes from the code spans of table rows before the page is rendered.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT_PAGES = {"index.md": "README.md", "changelog.md": "CHANGELOG.md"}

# The start of the target of an inline link or image, ``](...``, or of a reference definition,
# ``[name]: ...``, optionally in angle brackets and after ``./``.
_TARGET = r"(\]\(\s*<?|^[ \t]*\[[^\]\n]+\]:[ \t]*<?)(?:\./)?"
_DOCS_LINK = re.compile(_TARGET + r"docs/", re.MULTILINE)
_ROOT_LINKS = [
    (re.compile(_TARGET + re.escape(source) + r"(?=[)#>\s]|$)", re.MULTILINE), page)
    for page, source in ROOT_PAGES.items()
]


def to_site_links(markdown: str) -> str:
    """Rewrite the repository-relative link targets of a root page for the site."""
    markdown = _DOCS_LINK.sub(r"\1", markdown)
    for pattern, page in _ROOT_LINKS:
        markdown = pattern.sub(lambda m, page=page: m.group(1) + page, markdown)
    return markdown


_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def unescape_table_pipes(markdown: str) -> str:
    """``\\|`` -> ``|`` inside the code spans of table rows, outside fenced code blocks."""
    out, fence = [], None
    for line in markdown.split("\n"):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None and line.lstrip().startswith("|"):
            line = _CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
        out.append(line)
    return "\n".join(out)


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files: Files, config) -> Files:
    root = _root(config)
    for page, source in ROOT_PAGES.items():
        if files.get_file_from_path(page) is not None:
            raise ValueError(f"docs/{page} must not exist: the site generates it from {source}")
        content = to_site_links((root / source).read_text(encoding="utf-8"))
        files.append(File.generated(config, page, content=content))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return unescape_table_pipes(markdown)


def on_serve(server, config, builder):
    root = _root(config)
    for source in ROOT_PAGES.values():
        server.watch(str(root / source))
    return server
