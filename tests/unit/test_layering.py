"""The package's layering (docs/design.md, "Layers"): lower layers never import higher ones, no two modules
import each other, and no file refers to a document outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ..helpers import ROOT

PACKAGE = ROOT / "megatron_dapo"
LOWER = ("algorithm", "reward", "data", "ops", "weights")
HIGHER = ("megatron_dapo.actor", "megatron_dapo.rollout", "megatron_dapo.trainer", "megatron_dapo.cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the ``megatron_dapo`` modules it imports (absolute imports: the package uses no relative ones)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[_module(path)] = {name for name in found if name.startswith("megatron_dapo")}
    return graph


def test_lower_layers_import_no_higher_one():
    for module, imported in _imports().items():
        if module.split(".")[1:2] and module.split(".")[1] in LOWER:
            assert not [name for name in imported if name.startswith(HIGHER)], module
        if module == "megatron_dapo.batch":
            assert not [name for name in imported if name.startswith(("megatron_dapo.rollout", "megatron_dapo.reward", "megatron_dapo.data"))]


def test_no_two_modules_import_each_other():
    graph = _imports()
    modules = set(graph)

    def owner(name: str) -> str:  # the module an imported name lives in
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges = {module: {owner(name) for name in imported} - {module} for module, imported in graph.items()}
    for a, targets in edges.items():
        for b in targets:
            package_and_member = b.startswith(a + ".") or a.startswith(b + ".")
            assert package_and_member or a not in edges.get(b, set()), f"{a} <-> {b}"


def test_no_file_refers_to_a_document_outside_the_repository():
    outside = "shared" + "/reference"  # spelled in two parts so that this file does not match itself
    pattern = re.compile(r"\.\./" + "shared" + "|" + outside)
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".md", ".yaml", ".sh", ".sbatch") or not path.is_file():
            continue
        if {".venv", ".git", "outputs"} & set(path.relative_to(ROOT).parts):
            continue
        assert not pattern.search(path.read_text(errors="ignore")), path
