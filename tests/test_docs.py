"""docs/architecture.md read as a newcomer reads it: every module, function and test it names exists, every
`ramoe` command and option it shows is real, and nothing it links leaves the repository."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

from ramoe_ray.cli import build_parser
from ramoe_ray.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
MODULES = {p.stem for p in (REPO / "ramoe_ray").glob("*.py")}
FILE_SUFFIXES = {"py", "json", "jsonl", "parquet", "md", "html", "png", "yaml", "db", "txt", "tsv", "safetensors"}


def _code_spans() -> list[str]:
    return re.findall(r"`([^`\n]+)`", DOC.read_text())


def test_every_module_file_named_exists():
    named = {m.group(1) for span in _code_spans() for m in [re.fullmatch(r"(?:ramoe_ray/)?([a-z_]+)\.py", span)] if m}
    named -= {"setup", "conftest"}
    assert named, "the doc names no module"
    assert named <= MODULES | {p.stem for p in (REPO / "tests").glob("*.py")} | {p.stem for p in (REPO / "bench").glob("*.py")}, \
        sorted(named - MODULES)


def test_every_module_attribute_named_exists():
    """`module.name` spans whose module is one of the package's: the attribute exists."""
    missing = []
    for span in _code_spans():
        m = re.fullmatch(r"([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*)(?:\(.*\))?", span)
        if not m or m.group(1) not in MODULES or m.group(2) in FILE_SUFFIXES:
            continue
        module = importlib.import_module(f"ramoe_ray.{m.group(1)}")
        if not hasattr(module, m.group(2)) and not _config_field(m.group(1), m.group(2)):
            missing.append(span)
    assert not missing, missing


def _help(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--help"])
    return out.getvalue()


def _config_field(section: str, name: str) -> bool:
    """``tracking.mlflow_uri`` and the like name a config field, not a module attribute."""
    field = RunConfig.model_fields.get(section)
    return field is not None and name in getattr(field.annotation, "model_fields", {})


def _subcommands() -> dict[str, set[str]]:
    """Each subcommand and its options, read from the parser's own --help."""
    names = re.search(r"\{([a-z,]+)\}", _help()).group(1).split(",")
    return {name: set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(name))) for name in names}


@pytest.mark.parametrize("doc", [DOC, REPO / "README.md"], ids=["architecture", "README"])
def test_every_ramoe_command_and_option_shown_is_real(doc):
    commands = _subcommands()
    shown = re.findall(r"(?:^|`|\.venv/bin/)ramoe ([a-z]+)\b([^`\n]*)", doc.read_text(), re.M)
    assert shown
    for name, rest in shown:
        assert name in commands, f"`ramoe {name}` is not a command ({', '.join(commands)})"
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert opt in commands[name], f"`ramoe {name}` has no option {opt}"


def test_links_stay_inside_the_repository():
    for target in re.findall(r"\]\(([^)#]+)", DOC.read_text()):
        if "://" in target:
            continue
        path = (DOC.parent / target).resolve()
        assert REPO in path.parents or path == REPO, f"{target} points outside the repository"
        assert path.exists(), f"{target} does not exist"
