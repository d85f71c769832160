"""The documentation against the repository: README.md is a short front door, and what it and docs/ name exists.

- every repository path that README.md or a docs/ page names in backticks (a code span or a fenced block's
  command) or as a Markdown link exists;
- every module of the library (``platform/pretrainlab/**/*.py``, ``__init__.py`` aside) is named in README.md;
- README.md has at most 250 lines and links every docs/ page.

No Ray, no servers: text and the file tree only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "platform" / "pretrainlab"
LIBRARY_PREFIX = "platform/pretrainlab/"
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250

REPO_PREFIXES = (
    "platform/",
    "jobs/",
    "serve/",
    "configs/",
    "benchmarks/",
    "tests/",
    "docs/",
    "scripts/",
    "deploy/",
    ".ci/",
)
"""A backticked word that starts with one of these is a path from the repository root."""
IGNORED_PREFIXES = ("runs/", "data/", "outputs/", "weights/", "mlartifacts/")
"""Folders that a run makes (or a user fills), not the repository's."""
PLACEHOLDERS = ("*", "<", "{", "...")
"""A path with one of these stands for many (``configs/<name>.yaml``, ``tests/test_*.py``)."""

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
LINE_SUFFIX = re.compile(r":\d+(?:[-:]\d+)*$")
LEADING = "([{'\"<"
TRAILING = ".,;:!?)]}'\">"


@dataclass(frozen=True)
class Mention:
    """A path as a document names it: the file, its line, the path from the repository root, as written."""

    doc: str
    line: int
    path: str
    written: str

    def __str__(self) -> str:
        shown = self.path if _normal(self.written) == self.path else f"{self.path} (written {self.written!r})"
        return f"{self.doc}:{self.line}: {shown}"


def _fenced_lines(text: str) -> list[bool]:
    """For each line of ``text``: whether it belongs to a fenced code block (its fences included)."""
    inside = []
    fence: str | None = None
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
            inside.append(fence is not None)
        else:
            closing = match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence)
            if closing and not line.strip(" `~"):
                fence = None
            inside.append(True)
    return inside


def _without_fences(text: str) -> str:
    """``text`` with every fenced code block blanked, line breaks kept (so offsets keep their line numbers)."""
    lines = text.split("\n")
    return "\n".join("" if fenced else line for line, fenced in zip(lines, _fenced_lines(text), strict=True))


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _clean(word: str) -> str:
    """A word of a code span as a path: surrounding punctuation and a ``:line`` suffix removed."""
    word = word.lstrip(LEADING).rstrip(TRAILING)
    word = LINE_SUFFIX.sub("", word)
    return word.rstrip(TRAILING)


def _skipped(path: str) -> bool:
    return any(p in path for p in PLACEHOLDERS) or path.startswith(IGNORED_PREFIXES)


def _normal(path: str) -> str:
    """``path`` from the repository root, ``./`` and ``..`` resolved, no trailing slash."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            else:
                parts.append(part)  # above the repository: reported as missing
            continue
        parts.append(part)
    return "/".join(parts)


def code_spans(text: str) -> list[tuple[int, str]]:
    """``(offset, content)`` of every inline code span outside fenced blocks."""
    return [(m.start(), m.group(2)) for m in CODE_SPAN.finditer(_without_fences(text))]


def _repo_paths(name: str, line: int, content: str) -> list[Mention]:
    """The words of ``content`` that are paths from the repository root (they start with a top-level folder)."""
    found = []
    for word in content.split():
        for piece in word.split("="):
            path = _clean(piece)
            if path.startswith(REPO_PREFIXES) and not _skipped(path):
                found.append(Mention(name, line, _normal(path), piece))
    return found


def span_paths(doc: Path) -> list[Mention]:
    """The repository paths that ``doc`` names in backticks: in code spans, and in fenced blocks (commands)."""
    text = doc.read_text()
    name = doc.relative_to(REPO).as_posix()
    blank = _without_fences(text)
    found = []
    for offset, content in code_spans(text):
        found += _repo_paths(name, _line_of(blank, offset), content)
    for number, (line, fenced) in enumerate(zip(text.split("\n"), _fenced_lines(text), strict=True), 1):
        if fenced and not FENCE.match(line):
            found += _repo_paths(name, number, line)
    return found


def link_paths(doc: Path) -> list[Mention]:
    """The repository paths that ``doc``'s Markdown links point at (relative to ``doc``'s folder)."""
    text = doc.read_text()
    name = doc.relative_to(REPO).as_posix()
    blank = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), _without_fences(text))
    base = doc.parent.relative_to(REPO).as_posix()
    found = []
    for m in LINK.finditer(blank):
        target = m.group(1)
        if SCHEME.match(target) or target.startswith(("#", "/")):
            continue
        target = target.split("#", 1)[0].split("?", 1)[0]
        if not target:
            continue
        path = _normal(f"{base}/{target}" if base not in ("", ".") else target)
        if not _skipped(path) and not _skipped(target):
            found.append(Mention(name, _line_of(blank, m.start()), path, target))
    return found


def stage_table_paths() -> list[Mention]:
    """The paths in README's stage table (``| stage | where |``): a repository path, or a library module's path
    relative to ``platform/pretrainlab`` (``train/loop.py``)."""
    lines = README.read_text().split("\n")
    found = []
    in_table = False
    for number, line in enumerate(lines, 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            in_table = False
            continue
        if [c.lower() for c in cells] == ["stage", "where"]:
            in_table = True
            continue
        if not in_table or set("".join(cells)) <= set("-: "):
            continue
        for _, content in code_spans(line):
            for word in content.split():
                path = _clean(word)
                if not path or _skipped(path) or path.startswith(REPO_PREFIXES):
                    continue  # repository paths are checked with the other spans
                if path.endswith((".py", "/")) or "/" in path:
                    found.append(Mention("README.md", number, LIBRARY_PREFIX + _normal(path), word))
    return found


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def library_modules() -> list[str]:
    """Every module of the library but the packages' ``__init__.py``, relative to ``platform/pretrainlab``."""
    return sorted(
        p.relative_to(LIBRARY).as_posix()
        for p in LIBRARY.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )


def named_in(text: str, module: str) -> bool:
    """Whether ``text`` names ``module`` by its path relative to the library or from the repository root.

    ``config.py`` is not named by ``analysis/print_config.py``, nor ``data/masks.py`` by ``data/scenes/masks.py``.
    """
    after = r"(?![\w/-])"
    relative = rf"(?<![\w./-]){re.escape(module)}{after}"
    rooted = rf"(?<![\w./-]){re.escape(LIBRARY_PREFIX + module)}{after}"
    return re.search(relative, text) is not None or re.search(rooted, text) is not None


def _missing(mentions: list[Mention]) -> list[Mention]:
    return [m for m in mentions if not (REPO / m.path).exists()]


def test_docs_exist():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no Markdown page"


def test_named_paths_exist():
    mentions = [m for doc in documents() for m in (*span_paths(doc), *link_paths(doc))]
    mentions += stage_table_paths()
    assert mentions, "no path found in README.md and docs/: the extraction is broken"
    missing = _missing(mentions)
    assert not missing, f"{len(missing)} named paths do not exist:\n" + "\n".join(map(str, missing))


def test_every_library_module_is_in_readme():
    text = README.read_text()
    modules = library_modules()
    assert modules, f"no module found under {LIBRARY}"
    unnamed = [m for m in modules if not named_in(text, m)]
    assert not unnamed, (
        f"{len(unnamed)} library modules are not named in README.md (write `{{path}}` relative to "
        f"{LIBRARY_PREFIX} in the stage table, e.g. `train/loop.py`):\n" + "\n".join(unnamed)
    )


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, more than {MAX_README_LINES}: move the detail to a docs/ page"
    )


def test_readme_links_every_docs_page():
    linked = {m.path for m in link_paths(README)}
    pages = [p.relative_to(REPO).as_posix() for p in sorted(DOCS.glob("*.md"))]
    unlinked = [p for p in pages + ["benchmarks/README.md"] if p not in linked]
    assert not unlinked, "README.md does not link:\n" + "\n".join(unlinked)


# The checks themselves, on small texts.


def test_code_spans_skip_fenced_blocks_and_span_lines():
    text = "a `jobs/x.py` b\n```bash\npython `jobs/in_fence.py`\n```\n``metrics.`val/top1` `` and `one\ntwo`\n"
    assert [c for _, c in code_spans(text)] == ["jobs/x.py", "metrics.`val/top1` ", "one\ntwo"]
    assert _fenced_lines(text) == [False, True, True, True, False, False, False]


def test_clean_strips_punctuation_and_line_suffixes():
    assert _clean("platform/pretrainlab/train/loop.py:42") == "platform/pretrainlab/train/loop.py"
    assert _clean("(jobs/pretrain.py),") == "jobs/pretrain.py"
    assert _clean("serve/app.py:10-20.") == "serve/app.py"
    assert _skipped("tests/test_<name>.py") and _skipped("configs/x_{a,b}.yaml") and _skipped("data/fmnist")


def test_named_in_needs_the_whole_path():
    assert named_in("`train/loop.py`", "train/loop.py")
    assert named_in("see `platform/pretrainlab/config.py`.", "config.py")
    assert not named_in("`analysis/print_config.py`", "config.py")
    assert not named_in("`data/scenes/masks.py`", "data/masks.py")
    assert not named_in("`tests/multinode_cluster.py`", "cluster.py")
    assert not named_in("`other/train/loop.py`", "train/loop.py")
