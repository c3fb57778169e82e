"""The layer rules of docs/architecture.md, enforced on every import in the tree (top level and inside functions).

Layers, lowest first; a module may import its own layer and the ones below, never one above:

0. foundation  -- keyedge.errors, deps, fileio, host, registry, stats, timing, validate
1. domain      -- keyedge.keys < data < models < defenses < checkpoints < attacks < postures < training
                  (ordered: a package imports only those before it)
2. deploy      -- keyedge.deploy and keyedge.exporters (writing, reading and running artifacts; keyedge.runtime is
                  the device-side name of keyedge.deploy.runtime)
3. benchmarks  -- keyedge.benchmarks (harnesses and the CI gate), then keyedge.benchmarks.experiments (scripts that
                  answer one question each; nothing but other experiments imports them)
4. application -- keyedge.app (quickstart, doctor) and keyedge.cli (the command line), keyedge.__main__

and keyedge.cli is imported by nothing but keyedge.__main__.  No two modules import each other, directly or
through others (a circle), except a registry package's ``__init__`` importing the modules that register into it.
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
    (
        "foundation",
        (
            "keyedge.errors",
            "keyedge.deps",
            "keyedge.fileio",
            "keyedge.host",
            "keyedge.registry",
            "keyedge.stats",
            "keyedge.timing",
            "keyedge.validate",
        ),
    ),
    (
        "domain",
        (
            "keyedge.keys",
            "keyedge.data",
            "keyedge.models",
            "keyedge.defenses",
            "keyedge.checkpoints",
            "keyedge.attacks",
            "keyedge.postures",
            "keyedge.training",
        ),
    ),
    ("deploy", ("keyedge.deploy", "keyedge.exporters", "keyedge.runtime")),
    ("benchmarks", ("keyedge.benchmarks",)),
    ("experiments", ("keyedge.benchmarks.experiments",)),
    ("application", ("keyedge.app", "keyedge.cli", "keyedge.__main__")),
]


#: scripts, not library: imported by nothing outside their own package
EXPERIMENTS = "keyedge.benchmarks.experiments"
#: layers whose packages are ordered: a package imports its own modules and the packages listed before it
ORDERED = {"domain"}
#: registry packages: their ``__init__`` imports the modules that register into it (the one allowed circle)
REGISTRIES = ("keyedge.exporters", "keyedge.attacks", "keyedge.defenses")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """Index of the layer a keyedge module belongs to (None: the package root ``keyedge`` itself).

    The most specific prefix wins (``keyedge.benchmarks.experiments`` is above ``keyedge.benchmarks``)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if _within(module, p) and (best is None or len(p) > best[1]):
                best = (index, len(p))
    return None if best is None else best[0]


def rank_of(module: str) -> tuple[int, int] | None:
    """(layer, position of the module's package within an ordered layer, else 0)."""
    layer = layer_of(module)
    if layer is None:
        return None
    name, prefixes = LAYERS[layer]
    if name not in ORDERED:
        return layer, 0
    return layer, next(i for i, p in enumerate(prefixes) if _within(module, p))


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
            experiment = _within(target, EXPERIMENTS) and not _within(module, EXPERIMENTS)
            if there > here or cli_rule or experiment:
                bad.append(f"{module}:{line} imports {target} ({LAYERS[here][0]} -> {LAYERS[there][0]})")
            elif rank_of(target) > rank_of(module):
                layer, prefixes = LAYERS[here]
                a, b = prefixes[rank_of(module)[1]], prefixes[rank_of(target)[1]]
                bad.append(f"{module}:{line} imports {target} ({layer}: {a} comes before {b})")
    return list(dict.fromkeys(bad))  # `from x import y` resolves twice to the same module


def import_graph(modules: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the keyedge modules it imports (anywhere in it), less a registry package's registering imports."""
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (source, is_package) in modules.items():
        for _, target in imports_of(module, source, is_package):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target not in known or target == module:
                continue
            if module in REGISTRIES and _within(target, module):
                continue  # `keyedge.defenses` importing `keyedge.defenses.keyed` registers it
            graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


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
    source, is_package = modules["keyedge.checkpoints"]
    wrong["keyedge.checkpoints"] = (
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
    assert any(b.startswith("keyedge.checkpoints:") and "keyedge.cli" in b for b in bad), bad
    assert any(b.startswith("keyedge.keys.transform:") and "benchmarks" in b for b in bad), bad
    assert any(b.startswith("keyedge.exporters.base:") and "keyedge.benchmarks" in b for b in bad), bad


def test_no_module_circles():
    found = circles(import_graph(tree_modules()))
    assert not found, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_circle_check_catches_a_new_circle():
    modules = tree_modules()
    source, is_package = modules["keyedge.keys.keyfile"]
    modules["keyedge.keys.keyfile"] = (source + "\nfrom keyedge.keys import fold\n", is_package)
    assert any({"keyedge.keys.fold", "keyedge.keys.keyfile"} <= set(c) for c in circles(import_graph(modules)))
    wrong = dict(modules)
    wrong["keyedge.models.backbones"] = (
        modules["keyedge.models.backbones"][0] + "\nimport keyedge.training.loop\n",
        False,
    )
    assert any("domain: keyedge.models comes before keyedge.training" in b for b in violations(wrong))
