"""The README serves the user first and its commands are real: every `bertforge` line in a fenced block
of README.md and docs/ parses with the CLI's own parser (the one `--help` prints)."""

import re
import shlex
from pathlib import Path

import pytest

from bertforge.cli import parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_commands(path: Path) -> list[str]:
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text("utf-8"), re.M | re.S):
        commands += [line.strip() for line in block.splitlines() if line.strip().startswith("bertforge ")]
    return commands


def test_the_readme_is_short_and_links_only_to_files_that_exist():
    text = (ROOT / "README.md").read_text("utf-8")
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / target).exists(), target


def test_the_readme_shows_every_command():
    shown = {shlex.split(c, comments=True)[1] for c in fenced_commands(ROOT / "README.md")}
    commands = next(a for a in parser()._actions if a.dest == "command").choices
    assert set(commands) <= shown, set(commands) - shown


@pytest.mark.parametrize("command", [c for d in DOCUMENTS for c in fenced_commands(d)])
def test_every_documented_command_parses(command, capsys):
    argv = shlex.split(command, comments=True)
    try:
        parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{command!r} does not parse (exit {exc.code}): {capsys.readouterr().err.strip()}")


def test_the_recipe_reference_is_a_recipe_bertforge_reads():
    import yaml

    from bertforge.recipe import Recipe, parse_recipe

    block = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "recipes.md").read_text("utf-8"), re.S).group(1)
    documented = parse_recipe(yaml.safe_load(block), "docs/recipes.md")
    # every section the recipe has is documented there
    assert set(yaml.safe_load(block)) == set(Recipe.model_fields)
    assert documented.validation.shard_batches == 64
