"""The project installs as one distribution with a working console script."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib

from service import cli
from tests.conftest import REPO_ROOT


def test_console_script_lists_every_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True
    )
    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    names = set(subparsers[0].choices)
    assert {"serve", "export", "train-demo", "eval-demo"} <= names
    for name in names:
        assert name in result.stdout


def test_openset_without_subcommand_exits_with_usage() -> None:
    assert cli.main([]) == 2


def test_dependencies_are_pinned_exactly() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    unpinned = [r for r in requirements if "==" not in r]
    assert not unpinned, f"unpinned requirements: {unpinned}"


def test_layout_folders_explain_themselves() -> None:
    for folder in [
        "models",
        "models/backbones",
        "models/pixel_decoders",
        "models/decoders",
        "models/language",
        "models/ops",
        "models/demo",
        "models/weights",
        "export",
        "service",
        "k8s",
        "docker",
        "tests",
        "load_tests",
    ]:
        path = REPO_ROOT / folder
        has_readme = (path / "README.md").is_file()
        init = path / "__init__.py"
        has_docstring = init.is_file() and init.read_text().lstrip().startswith('"""')
        assert has_readme or has_docstring, f"{folder} has neither README.md nor a module docstring"
