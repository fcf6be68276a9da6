"""The house rules, read from the source with ``ast`` (nothing is imported): the import graph points one way,
and no file or training function grows past the size one reader can hold.

Layers, top to bottom; a module imports only from its own layer or the layers below it:

0. entry points: the modules directly in ``avi_jax/`` (``train.py``, ``infer.py``, ``export.py``, ...)
1. ``inference/``, ``training/``
2. ``assembly/`` (builds a stage's modules and loads their parameters, for training *and* inference)
3. ``models/``, ``data/``, ``checkpoints/``, ``metrics/``, ``render/``
4. ``sharding.py``, ``errors.py``

Within a layer: ``inference/`` never imports ``training/`` (which pulls clu and TensorFlow), and ``models/``
imports nothing from ``data/`` or ``checkpoints/`` (models are pure modules; file readers sit beside them).
Imports inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "avi_jax"

LAYERS = {
    "inference": 1, "training": 1,
    "assembly": 2,
    "models": 3, "data": 3, "checkpoints": 3, "metrics": 3, "render": 3,
    "sharding": 4, "errors": 4,
}
ENTRY = 0
FORBIDDEN = {                      # (importer part, imported part) pairs that the layer order alone allows
    ("inference", "training"),
    ("models", "data"),
    ("models", "checkpoints"),
}
HEAVY_FOR_INFERENCE = ("clu", "tensorflow")   # roots that nothing inference loads at import time may import
MAX_FILE_LINES = 600
MAX_TRAINING_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import statement of the file. ``from a import b``
    yields ``a.b`` (which is ``a``'s attribute or submodule ``b``); relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in tree.body:                                     # module-level try/if blocks count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(f"{base}.{a.name}" if a.name != "*" else base, node.lineno, id(node) in top_level)
                    for a in node.names]
    return out


def _part(module: str) -> str | None:
    """The layer key of an ``avi_jax`` module (``models``, ``sharding``, ...), ``''`` for an entry point, None
    for the package itself or a module outside ``avi_jax``."""
    parts = module.split(".")
    if parts[0] != "avi_jax" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else ""


def _layer(part: str) -> int:
    return ENTRY if part == "" else LAYERS[part]


def test_every_subpackage_has_a_layer():
    unknown = sorted({p.name for p in PACKAGE.iterdir()
                      if p.is_dir() and p.name != "__pycache__" and any(p.rglob("*.py")) and p.name not in LAYERS})
    assert not unknown, f"avi_jax/{unknown}: give each new subpackage a layer in tests/test_imports.py"


def test_imports_point_down():
    violations = []
    for module, path in _sources().items():
        src = _part(module)
        if src is None:
            continue
        for target, line, _ in _imports(path, module):
            dst = _part(target)
            if dst is None or (src, dst) == ("", ""):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}"
            if _layer(dst) < _layer(src):
                violations.append(f"{where} (up: {dst or 'an entry point'} is above {src or 'the entry points'})")
            elif (src, dst) in FORBIDDEN:
                violations.append(f"{where} ({src}/ must not import {dst}/)")
    assert not violations, "imports that point the wrong way:\n" + "\n".join(violations)


def test_inference_loads_neither_clu_nor_tensorflow():
    """What ``avi_jax.inference`` imports at module level, followed through ``avi_jax``, never imports clu or
    TensorFlow at module level (a function may import them lazily, e.g. to prepare a dataset)."""
    sources = _sources()
    start = [m for m in sources if m.startswith("avi_jax.inference")]
    if not start:
        pytest.skip("no avi_jax/inference package yet")
    seen, stack, bad = set(), list(start), []
    while stack:
        module = stack.pop()
        if module in seen or module not in sources:
            continue
        seen.add(module)
        for target, line, top in _imports(sources[module], module):
            if not top:
                continue
            if target.split(".")[0] in HEAVY_FOR_INFERENCE:
                bad.append(f"{sources[module].relative_to(PACKAGE.parent)}:{line}: imports {target}")
            # ``from pkg import mod`` names pkg.mod: follow it and every package above it (their __init__ run)
            parts = target.split(".")
            stack += [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in sources]
    assert not bad, "reached from avi_jax.inference at import time:\n" + "\n".join(bad)


def test_no_file_over_600_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by concept):\n" + "\n".join(long)


def test_no_training_function_over_80_lines():
    """The training package in short named pieces (state creation, step, loop iteration, loop, export)."""
    long = []
    for path in sorted((PACKAGE / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_TRAINING_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.name} ({n} lines)")
    assert not long, (f"training functions over {MAX_TRAINING_FUNCTION_LINES} lines:\n" + "\n".join(long))
