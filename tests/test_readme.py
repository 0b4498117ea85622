"""README.md and the manual in docs/ say what the code does.

Every `python cli.py ...` command of README.md and of every docs/ page parses against the real
CLI (the demo runs the demo's commands for real, tests/test_demo.py), so no page names a command,
option or choice that no longer exists; README's links into docs/ reach a page and a heading
(`mkdocs build --strict` checks the links between the pages); README's Python example runs.
"""

import re
import shlex
from pathlib import Path

import click
import markdown
import pytest
import torch

import cli
from align.checkpoints import save_head
from align.models import build_head
from cache import FeatureCache
from cache.synthetic import SynthConfig, generate_synthetic

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# the commands a user must be able to find in the documentation
MAIN_COMMANDS = ("extract", "train-heads", "evaluate", "info", "visualize", "analyze", "synth",
                 "sweep", "adapt-backbone", "demo")
PRODUCT_COMMANDS = ("extract", "train-heads", "evaluate")


def page_commands(page: Path) -> list[str]:
    commands = []
    for line in page.read_text().splitlines():
        for match in re.finditer(r"python cli\.py ([^`|&\\\n]+)", line):
            commands.append(match.group(1).strip())
    return commands


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def parse(args: list[str]) -> None:
    group_ctx = cli.cli.make_context("cli", list(args), resilient_parsing=True)
    name, command, rest = cli.cli.resolve_command(group_ctx, list(args))
    if isinstance(command, click.Group):
        sub_ctx = command.make_context(name, list(rest), resilient_parsing=True)
        name, command, rest = command.resolve_command(sub_ctx, list(rest))
    try:
        command.make_context(name, list(rest))
    except click.BadParameter as error:
        # paths that exist only on a user's machine are fine; unknown options/choices are not
        if "does not exist" not in str(error):
            raise


def test_every_page_is_read():
    names = {page.name for page in PAGES}
    assert {"README.md", "extract.md", "train-evaluate.md", "results.md"} <= names


def test_the_documentation_shows_the_main_commands():
    commands = [c for page in PAGES for c in page_commands(page)]
    for command in MAIN_COMMANDS:
        assert any(c.split()[0] == command for c in commands), command


def test_readme_shows_the_three_product_commands():
    commands = page_commands(README)
    for command in PRODUCT_COMMANDS:
        assert any(c.split()[0] == command and len(c.split()) > 1 for c in commands), command


@pytest.mark.parametrize(("page", "command"),
                         [(name(p), c) for p in PAGES for c in page_commands(p)])
def test_documented_command_parses(page, command):
    args = shlex.split(command.split("#")[0])
    # placeholders like CACHE, [CACHE] or REPORT_A stand for the user's own values
    args = ["x" if re.fullmatch(r"\[?[A-Z_]+\]?", a) else a.strip("[]") for a in args]
    args = [a for a in args if a and "|" not in a and not a.startswith("$")]
    if len(args) == 1:  # a bare mention in prose, e.g. "`python cli.py extract`"
        assert args[0] in cli.cli.commands, page
        return
    parse(args)


# ------------------------------------------------------------------------ README's links
def heading_ids(page: Path) -> set[str]:
    """The anchors MkDocs makes for a page's headings (the same toc slugs)."""
    md = markdown.Markdown(extensions=["toc", "tables", "attr_list", "fenced_code"])
    md.convert(page.read_text())
    ids, stack = set(), list(md.toc_tokens)
    while stack:
        token = stack.pop()
        ids.add(token["id"])
        stack.extend(token["children"])
    return ids


def readme_links() -> list[str]:
    text = re.sub(r"<!--.*?-->", "", README.read_text(), flags=re.S)  # a comment is no link
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text)]


def test_readme_links_into_docs_reach_a_page_and_a_heading():
    links = [link for link in readme_links() if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        assert path, f"README links to #{anchor} on itself: the sections live in docs/"
        target = ROOT / path
        assert target.is_file(), link
        if anchor:
            assert anchor in heading_ids(target), link


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, re.M))
    assert listed == {p.name for p in PAGES if p != README}


# ------------------------------------------------------------------ README's Python example
def readme_example() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The example as written, on a small cache and an untrained head at the demo's paths."""
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "caches" / "demo.zarr")
    generate_synthetic(cache, SynthConfig(channels=8, frames=8, size=4, train_classes=5,
                                          val_classes=5, test_classes=5, videos_per_class=4,
                                          seed=0), progress=False)
    with FeatureCache.open(cache) as opened:
        c, t, h, w = opened.shape
    head = build_head("ta2n", channels=c, frames=t, height=h, width=w, shot=1, seed=0)
    (tmp_path / "runs/demo/ta2n").mkdir(parents=True)
    save_head(head, tmp_path / "runs/demo/ta2n/best.pt")
    code = readme_example()
    assert len(code.splitlines()) <= 12
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own code
    accuracy = float(capsys.readouterr().out.strip())
    assert accuracy in {k / 10 for k in range(11)}  # 10 queries
    assert namespace["logits"].shape == (10, 5) and torch.isfinite(namespace["logits"]).all()


def test_readme_is_a_front_door():
    """The manual lives in docs/; README stays short enough to read at once."""
    assert len(README.read_text().splitlines()) <= 250
