"""The front page and docs/ as a reader meets them: README.md stays a front page, every in-repo link (and #anchor)
resolves, and every command, module, script and config path they name exists. Read, never run: it takes a second.
Every page in docs/ is found by its name, so a new page is checked with no change here."""

import glob
import itertools
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# the paper's fact sheet: the paths and commands it quotes are the authors' repositories' (kongds/MoRA's
# `configs/llama_250m.json`, ...), not this one's; its links are checked like every page's
OTHERS_REPOS = {REPO / "docs" / "PAPER.md"}
FRONT_PAGE_LINES = 260

FENCE = re.compile(r"^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
SHELL = {"bash", "sh", "shell", "console"}
# a path of this repository named in the text: brace groups ({tiny,paper}), placeholders (<name>) and globs allowed
REPO_PATH = re.compile(r"(?<![\w./-])(?:configs|mora|scripts|experiments|tests)/(?:[\w.*<>/-]|\{[^}\s]*\})*")


def _id(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a link or heading there is code)."""
    return FENCE.sub("", text)


def _shell_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in SHELL]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercased, every character but letters, marks, digits,
    hyphens, underscores and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = (c for c in text if c in "-_ " or c.isalnum() or unicodedata.category(c).startswith("M"))
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(_prose(page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_slug_follows_githubs_rules():
    assert slug("Table 2 on one GPU (`PROFILE=gpu`)") == "table-2-on-one-gpu-profilegpu"
    assert slug("The regime, measured on CPU (`make reproduce-table2-regime`)") == (
        "the-regime-measured-on-cpu-make-reproduce-table2-regime"
    )
    assert slug("What differs from the authors' code (kongds/MoRA, peft-mora fork at d0528b4)") == (
        "what-differs-from-the-authors-code-kongdsmora-peft-mora-fork-at-d0528b4"
    )
    assert slug("The r̂ rule") == "the-r̂-rule"
    assert slug("Tables 1–4 with [a link](x.md)") == "tables-14-with-a-link"


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= FRONT_PAGE_LINES, f"README.md has {len(lines)} lines; move details to a page in docs/"


def test_the_front_page_links_every_docs_page():
    linked = {
        (REPO / target.split("#")[0]).resolve()
        for target in LINK.findall(CODE_SPAN.sub("", _prose((REPO / "README.md").read_text())))
    }
    unlinked = [_id(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(CODE_SPAN.sub("", _prose(page.read_text()))):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.is_relative_to(REPO) or not where.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target} (no heading #{anchor} in {_id(where)})")
    assert not broken, f"{_id(page)}: {broken}"


def _commands(text: str) -> list[list[str]]:
    """The commands of the page's shell blocks and of its inline code that starts with make / python / bash: each a
    list of words, continuation lines joined, comments dropped, split at ;, &&, || and |."""
    lines = [line for block in _shell_blocks(text) for line in block.replace("\\\n", " ").splitlines()]
    lines += [span.strip("`") for span in CODE_SPAN.findall(_prose(text))]
    commands = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose code: not a command
            continue
        current: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&&", "||", "|"):
                if current and current[0] in ("make", "python", "python3", "bash"):
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def _makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for names in re.findall(r"^([\w.%-][\w.% -]*):(?!=)", text, re.M) for t in names.split()}


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


@pytest.mark.parametrize("page", [p for p in PAGES if p not in OTHERS_REPOS], ids=_id)
def test_every_command_names_what_exists(page):
    targets = _makefile_targets()
    missing = []
    for words in _commands(page.read_text()):
        program, args = words[0], words[1:]
        if program == "make":
            missing += [f"make {a}" for a in args if "=" not in a and not a.startswith("-") and a not in targets]
        elif args and args[0] == "-m":
            if len(args) > 1 and args[1].split(".")[0] == "mora" and not _is_module(args[1]):
                missing.append(f"python -m {args[1]}")
        elif args and re.fullmatch(r"(experiments|scripts)/[\w./-]+", args[0]) and not (REPO / args[0]).is_file():
            missing.append(f"{program} {args[0]}")
    assert not missing, f"{_id(page)} names what does not exist: {missing}"


def _expand(path: str) -> list[str]:
    """configs/x_{tiny,paper}.yaml -> both; <placeholder> -> a glob."""
    parts = re.split(r"(\{[^}]*\})", re.sub(r"<[^>]*>", "*", path))
    choices = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
    return ["".join(combination) for combination in itertools.product(*choices)]


@pytest.mark.parametrize("page", [p for p in PAGES if p not in OTHERS_REPOS], ids=_id)
def test_every_repository_path_exists(page):
    missing = []
    for mention in REPO_PATH.findall(page.read_text()):
        for path in _expand(mention.rstrip(".")):
            if not glob.glob(str(REPO / path)):
                missing.append(path if path == mention else f"{path} (from {mention})")
    assert not missing, f"{_id(page)} names paths that do not exist: {missing}"
