"""The README as users and CI read it: its size, its two commands (the second one is what `.ci/run`
runs), a Layout section that names every module, and relative links that resolve. Reads files
only: no model, no compilation."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results" / "RESULTS.md"
MAX_README_BYTES = 12_288

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, title: str) -> str:
    """The body of the `## title` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _ci_pattern() -> re.Pattern:
    """The extended regular expression `.ci/run` greps README.md with."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r"grep -E '([^']+)' README\.md", script)
    assert match, ".ci/run no longer greps README.md with `grep -E '...'`: update this test"
    return re.compile(match.group(1))


def _layout_entries(text: str) -> set[str]:
    """Paths named in the Layout block: a line at column 0 is a path from the repository root, a
    line indented by two spaces is a path under the last column-0 folder, deeper lines continue a
    description."""
    block = FENCE.search(_section(text, "Layout"))
    assert block, "the Layout section has no code block"
    entries, folder = set(), ""
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        if indent == 0:
            folder = name if name.endswith("/") else ""
            entries.add(name.rstrip("/"))
        elif indent == 2:
            assert folder, f"indented Layout entry outside a folder: {line!r}"
            entries.add((folder + name).rstrip("/"))
    return entries


def _relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images outside code, without URLs and fragments."""
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for target in re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_at_most_12_kib():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes, more than {MAX_README_BYTES}"


def test_first_code_block_is_the_two_commands():
    block = FENCE.search(_readme())
    assert block, "README.md has no code block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2, lines
    demo, tests = lines
    assert demo.startswith("pip install ") and '".[peft]"' in demo and "python examples/quickstart.py" in demo
    assert tests.startswith("pip install ") and '".[test]"' in tests and "python -m pytest" in tests
    for line in lines:
        shlex.split(line)  # each is one well-formed shell line


def test_ci_selects_exactly_the_test_command():
    pattern = _ci_pattern()
    selected = [line for line in _readme().splitlines() if pattern.search(line)]
    assert len(selected) == 1, f".ci/run would select {len(selected)} lines: {selected}"
    assert "pytest" in selected[0]
    assert selected[0] in FENCE.search(_readme()).group(1).splitlines()


def _named(section: str, entries: set[str], rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return rel in entries or rel in section or re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", section)


def test_layout_names_every_module_and_every_bench_and_docs_file():
    text = _readme()
    section, entries = _section(text, "Layout"), _layout_entries(text)
    required = [p for folder in ("lora_pass", "patterns") for p in (ROOT / folder).rglob("*.py")
                if "_logs" not in p.relative_to(ROOT).parts and "__pycache__" not in p.parts]
    required += [p for folder in ("bench", "docs") for p in (ROOT / folder).iterdir() if p.is_file()]
    assert required
    missing = sorted(str(p.relative_to(ROOT)) for p in required
                     if not _named(section, entries, p.relative_to(ROOT).as_posix()))
    assert missing == [], f"not named in README.md's Layout section: {missing}"


def test_layout_names_only_what_exists():
    """Every path of the Layout block exists."""
    gone = sorted(e for e in _layout_entries(_readme()) if not (ROOT / e).exists())
    assert gone == [], f"README.md's Layout names paths that do not exist: {gone}"


def test_relative_links_resolve():
    for doc in (README, RESULTS):
        links = _relative_links(doc.read_text(encoding="utf-8"))
        broken = sorted({t for t in links if not (doc.parent / t).exists()})
        assert broken == [], f"{doc.relative_to(ROOT)}: links to missing files: {broken}"
    assert _relative_links(_readme()), "README.md has no relative link (the parser may be broken)"
