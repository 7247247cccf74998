"""The package, its dependency lists and the two commands stay consistent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {r.strip() for r in project["dependencies"] + extras["test"] + extras["interop"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {r.strip() for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, (
        f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    )


def test_readme_quick_start_shows_the_two_commands_first():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    assert "make labs" in first_block and "make test" in first_block


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _help_page(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "labkit.cli", *args, "--help"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip


def _commands_listed(help_page: str) -> set[str]:
    """The names in the Commands panel of a Typer help page (one per row; a wrapped
    description continues on rows that start with spaces, not with a name)."""
    panel = help_page.split("Commands", 1)[1]
    return {m.group(1) for m in re.finditer(r"^[│|] (\S+)  ", panel, flags=re.MULTILINE)}


def test_cli_help_lists_every_command():
    """Every command registered on the Typer app (and in each command group) is listed
    by its --help, and the documented commands are registered."""
    import typer

    from labkit.cli import app

    root = typer.main.get_command(app)  # the command group Typer builds from the app
    registered = {name for name, cmd in root.commands.items() if not cmd.hidden}
    assert {"labs", "local-api", "ttft", "chat", "sessions", "serve"} <= registered
    assert _commands_listed(_help_page()) == registered
    groups = {name: cmd for name, cmd in root.commands.items() if hasattr(cmd, "commands")}
    assert "sessions" in groups
    for name, group in groups.items():
        sub = {n for n, cmd in group.commands.items() if not cmd.hidden}
        assert sub and _commands_listed(_help_page(name)) == sub, name


def test_public_api_names_exist():
    import labkit

    missing = [name for name in labkit.__all__ if not hasattr(labkit, name)]
    assert missing == []


def test_makefile_builds_the_llama_cpp_version_pyproject_pins():
    pinned = next(
        r
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if _name(r) == "llama-cpp-python"
    )
    built = re.search(r"^LLAMA_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert built and pinned == f"llama-cpp-python=={built.group(1)}"
