"""The layout's rules that import-linter cannot see (its contracts are in pyproject.toml
and run by scripts/test.sh): no module reaches into another module's private names, and
no import of a project package hides inside a function unless it is listed here with
the reason it must be lazy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("broker", "actors", "scheduler", "clients")

# (importing file, imported module): why the import waits until it is needed.
_CLI = "a `lego` subcommand's own stack: every other subcommand would import it at start (2x its start-up)"
LAZY_IMPORTS = {
    ("clients/cli/commands.py", "clients.gateway.server"): "aiohttp costs every other subcommand ~0.3 s",
    **{("clients/cli/commands.py", module): _CLI for module in (
        "broker.server", "actors.agent", "actors.runtime", "scheduler.controller", "actors.models.tiny",
        "clients.local", "clients.bench.overhead", "clients.bench.cluster", "clients.bench.sim.bench", "clients.bench.sim.suite",
        "clients.bench.scheduler", "clients.bench.lora", "clients.bench.chaos")},
    ("actors/models/tiny.py", "actors.models.single_file"): "imports torch; building catalogs needs none",
    ("clients/bench/gpu_check.py", "actors.backends.diffusers"): "imports torch and diffusers; the GPU check's "
                                                                "driver and its other stages need neither",
}


def _modules():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text())


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _project_module(node: ast.Import | ast.ImportFrom) -> str | None:
    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
    if isinstance(node, ast.ImportFrom) and node.level:
        return None
    return name if name and name.split(".")[0] in PACKAGES else None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_a_private_name_of_another():
    found = []
    for path, tree in _modules():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _project_module(node):
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{path}:{node.lineno} from {node.module} import {alias.name}")
                    aliases[alias.asname or alias.name] = node.module
            elif isinstance(node, ast.Import) and _project_module(node):
                for alias in node.names:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_project_imports_sit_at_module_level():
    found = []
    for path, tree in _modules():
        type_checking = {id(n) for block in tree.body if _is_type_checking_block(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0 or id(node) in type_checking:
                continue
            module = _project_module(node)
            if module and (path, module) not in LAZY_IMPORTS:
                found.append(f"{path}:{node.lineno} {module}")
    assert not found, "imports inside functions hide the layers' ties; hoist them or list why:\n" + "\n".join(found)


@pytest.mark.parametrize(("path", "module"), sorted(LAZY_IMPORTS))
def test_every_listed_lazy_import_still_exists(path, module):
    tree = ast.parse((REPO / path).read_text())
    assert any(isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset > 0 and _project_module(n) == module
               for n in ast.walk(tree)), f"{path} no longer imports {module} lazily: drop it from LAZY_IMPORTS"
