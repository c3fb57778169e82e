"""The layer rules of docs/architecture.md, enforced on every import in the tree (top level and inside functions).

Layers, lowest first; a module may import its own layer and the ones below, never one above:

0. foundation  -- keyedge.errors, deps, fileio, stats, validate
1. domain      -- keyedge.keys, models, defenses, data, training
2. deploy      -- keyedge.deploy, keyedge.exporters and keyedge.runtime (writing, reading and running artifacts)
3. benchmarks  -- keyedge.benchmarks (latency, robustness, attacks)
4. application -- keyedge.app (quickstart, doctor) and keyedge.cli (the command line), keyedge.__main__

and keyedge.cli is imported by nothing but keyedge.__main__.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source directories -> the package they are installed as (pyproject's package-dir)
TREES = {
    ROOT / "keyedge": "keyedge",
    ROOT / "exporters": "keyedge.exporters",
    ROOT / "benchmarks": "keyedge.benchmarks",
}
LAYERS = [
    ("foundation", ("keyedge.errors", "keyedge.deps", "keyedge.fileio", "keyedge.stats", "keyedge.validate")),
    ("domain", ("keyedge.keys", "keyedge.models", "keyedge.defenses", "keyedge.data", "keyedge.training")),
    ("deploy", ("keyedge.deploy", "keyedge.exporters", "keyedge.runtime")),
    ("benchmarks", ("keyedge.benchmarks",)),
    ("application", ("keyedge.app", "keyedge.cli", "keyedge.__main__")),
]


def layer_of(module: str) -> int | None:
    """Index of the layer a keyedge module belongs to (None: the package root ``keyedge`` itself)."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def imports_of(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in ``source``, relative imports resolved."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from keyedge import cli`
    return found


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that breaks the layer rules, as ``module:line imports target (layer -> layer)``."""
    known = set(modules)
    bad = []
    for module, (source, is_package) in modules.items():
        here = layer_of(module)
        if here is None:
            continue
        for line, target in imports_of(module, source, is_package):
            if not target.startswith("keyedge"):
                continue
            while target not in known and "." in target:  # `from keyedge.x import name`: the module is keyedge.x
                target = target.rpartition(".")[0]
            there = layer_of(target)
            if there is None:
                continue
            cli_rule = target.startswith("keyedge.cli") and not module.startswith(("keyedge.cli", "keyedge.__main__"))
            if there > here or cli_rule:
                bad.append(f"{module}:{line} imports {target} ({LAYERS[here][0]} -> {LAYERS[there][0]})")
    return list(dict.fromkeys(bad))  # `from x import y` resolves twice to the same module


def tree_modules() -> dict[str, tuple[str, bool]]:
    modules = {}
    for directory, package in TREES.items():
        for path in directory.rglob("*.py"):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts]) if parts else package
            modules[name] = (path.read_text(), path.name == "__init__.py")
    return modules


def test_every_module_is_in_a_layer():
    missing = [m for m in tree_modules() if m != "keyedge" and layer_of(m) is None]
    assert not missing, f"modules outside every layer (add them to docs/architecture.md and LAYERS): {missing}"


def test_no_import_breaks_the_layers():
    bad = violations(tree_modules())
    assert not bad, "imports that break the layer rules:\n" + "\n".join(bad)


def test_the_rule_check_catches_a_wrong_import():
    modules = tree_modules()
    wrong = dict(modules)
    source, is_package = modules["keyedge.models.checkpoint"]
    wrong["keyedge.models.checkpoint"] = (
        source + "\n\ndef _f():\n    from keyedge.cli._console import console\n",
        is_package,
    )
    wrong["keyedge.keys.transform"] = (
        modules["keyedge.keys.transform"][0] + "\nimport keyedge.benchmarks.latency\n",
        False,
    )
    wrong["keyedge.exporters.base"] = (
        modules["keyedge.exporters.base"][0] + "\nfrom ..benchmarks import gate\n",
        False,
    )
    bad = violations(wrong)
    assert any(b.startswith("keyedge.models.checkpoint:") and "keyedge.cli" in b for b in bad), bad
    assert any(b.startswith("keyedge.keys.transform:") and "benchmarks" in b for b in bad), bad
    assert any(b.startswith("keyedge.exporters.base:") and "keyedge.benchmarks" in b for b in bad), bad
