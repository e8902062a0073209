"""The package's import rules, checked on its source (an AST walk, function-local imports included).

Dependencies run one way: the foundation (specs, ops, models, transforms, data, checkpoints, run
layout, evaluation) imports nothing above it; ``train`` builds on it, ``tune`` on ``train``;
``registry`` on the foundation, ``serve`` on ``registry``; ``cluster`` on all of those; ``cli``
on top. Only ``cli`` talks to the terminal (typer, rich). Ray's private modules are used in the
named functions only, each with its reason in a comment there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "visionray"

FOUNDATION = {"defaults", "storage", "spec_io", "ops", "models", "transforms", "specs", "data", "checkpoint", "runs", "evaluate"}
ALLOWED = {  # stage -> the stages it may import (itself included)
    **{name: FOUNDATION for name in FOUNDATION},
    "train": FOUNDATION | {"train"},
    "tune": FOUNDATION | {"train", "tune"},
    "registry": FOUNDATION | {"registry"},
    "serve": FOUNDATION | {"registry", "serve"},
    "cluster": FOUNDATION | {"train", "tune", "registry", "serve", "cluster"},
    "cli": FOUNDATION | {"train", "tune", "registry", "serve", "cluster", "cli"},
    "__init__": set(),
}
TERMINAL = ("typer", "rich", "click")  # only cli/ talks to the terminal
RAY_PRIVATE = ("ray._private", "ray._raylet")
RAY_PRIVATE_USES = {  # module -> the functions allowed to reach into Ray's private modules
    "cluster.upload": {"_include_gitignore", "_walk", "measure_upload", "zipped_size"},
    "cluster.client": {"auth_headers"},
}


def stage_of(module: str) -> str:
    """``visionray.tune.run`` -> ``tune``; ``visionray.specs`` -> ``specs``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(tree: ast.AST) -> list[tuple[str, int, str | None]]:
    """(imported module, line, enclosing function or None) for every import in the tree."""
    found = []

    def walk(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "visionray":  # from visionray import data -> visionray.data
                    found.extend((f"visionray.{a.name}", child.lineno, func) for a in child.names)
                else:
                    found.append((child.module, child.lineno, func))
            walk(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func)

    walk(tree, None)
    return found


def violations(module: str, source: str) -> list[str]:
    """Every broken rule in one module's source, as readable lines."""
    stage, short = stage_of(module), module.removeprefix("visionray.")
    problems = []
    for target, line, func in imports(ast.parse(source)):
        where = f"{module}:{line}"
        if target.split(".")[0] in TERMINAL and stage != "cli":
            problems.append(f"{where} imports {target}: only visionray.cli talks to the terminal")
        if target.startswith(RAY_PRIVATE) and func not in RAY_PRIVATE_USES.get(short, set()):
            problems.append(f"{where} imports {target} in {func or 'module scope'}: Ray's private modules only in "
                            "the functions listed in RAY_PRIVATE_USES")
        if target.startswith("visionray."):
            other = stage_of(target)
            if other not in ALLOWED.get(stage, set()):
                problems.append(f"{where} imports {target}: {stage} may import only {', '.join(sorted(ALLOWED.get(stage, ())))}")
    return problems


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join(parts), path))
    return out


def test_the_package_keeps_its_import_rules():
    problems = [p for module, path in package_modules() for p in violations(module, path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, source, broken", [
    ("visionray.registry.registry", "from visionray.train.worker import Worker\n", "registry may import only"),
    ("visionray.serve.app", "def f():\n    from visionray.tune import run\n", "serve may import only"),
    ("visionray.specs", "def f():\n    from visionray.models import x\n    from visionray.train import optim\n",
     "specs may import only"),
    ("visionray.data.sources", "import visionray.serve.config\n", "data may import only"),
    ("visionray.tune.results", "def f():\n    from visionray import cli\n", "tune may import only"),
    ("visionray.train.driver", "import typer\n", "only visionray.cli talks to the terminal"),
    ("visionray.serve.app", "from rich.console import Console\n", "only visionray.cli talks to the terminal"),
    ("visionray.cluster.jobs", "from ray._private import utils\n", "Ray's private modules only"),
    ("visionray.cluster.upload", "def other():\n    import ray._private.runtime_env\n", "Ray's private modules only"),
])
def test_a_broken_rule_is_named(module, source, broken):
    found = violations(module, source)
    assert any(broken in p for p in found), found


@pytest.mark.parametrize("module, source", [
    ("visionray.cli.train", "import typer\nfrom visionray.train.driver import fit_with_progress\n"),
    ("visionray.serve.predictor", "from visionray.registry.registry import Registry\n"),
    ("visionray.tune.run", "def f():\n    from visionray.train.driver import build_trainer\n"),
    ("visionray.cluster.upload", "def measure_upload():\n    from ray._private import ray_constants\n"),
])
def test_an_allowed_import_passes(module, source):
    assert violations(module, source) == []
