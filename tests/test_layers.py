"""Imports go down the layers: every module of the package (and benchmarks/, scripts/) imports only
modules of its own layer or lower ones, function-local imports included. Parsed with ast: nothing is
imported. The layer table is docs/architecture.md's ("Layers and their contracts")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# bottom up; a module belongs to the layer of the longest prefix that names it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tilert.numerics", "tilert.gpu_specs", "tilert.progress", "tilert.tokenizer")),
    ("ops", ("tilert.ops",)),
    ("ir", ("tilert.ir",)),
    ("abi", ("tilert.abi",)),
    ("models", ("tilert.models",)),
    ("kernels", ("tilert.kernels",)),
    ("passes", ("tilert.passes",)),
    ("plan", ("tilert.plan",)),
    ("runtime", ("tilert.runtime",)),
    ("checkpoint", ("tilert.checkpoint",)),
    ("engine", ("tilert.engine",)),
    ("tools", ("tilert.serve", "tilert.profile")),
    ("cli", ("tilert.cli", "tilert.__main__")),
    ("benchmarks", ("benchmarks", "scripts")),
]
LEVEL = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}
# lower layers that a layer still must not import: the runtimes run a plan, they never compile one
APART = {"tilert.runtime": ("tilert.passes",)}
FACE = "tilert"  # tilert/__init__.py: the package face, public names loaded on first use


def layer_of(module: str) -> int | None:
    best = max((p for p in LEVEL if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LEVEL[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("models", "passes"):  # installed as tilert.models / tilert.passes
        parts.insert(0, "tilert")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[Path]:
    tops = ("tilert", "models", "passes", "benchmarks", "scripts")
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement, at any depth; `from a import b` names a.b too, since
    b may be a module."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def upward(module: str, source: str, where: str) -> list[str]:
    """One line per import of `module` (its text: source) from a higher layer or from tests/."""
    mine = layer_of(module)
    if module == FACE:
        return []
    assert mine is not None, f"{module} is in no layer: add it to LAYERS"
    bad = []
    for line, target in imports(source):
        if target.split(".")[0] == "tests":
            bad.append(f"{where}:{line} imports the test module {target}")
            continue
        theirs = layer_of(target)
        if theirs is not None and theirs > mine and target != FACE:
            bad.append(f"{where}:{line} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
        for low, banned in APART.items():
            if module.startswith(low + ".") and target.startswith(banned):
                bad.append(f"{where}:{line} ({LAYERS[mine][0]}) imports {target}, which it must not")
    return bad


def test_every_module_has_a_layer() -> None:
    assert not [p for p in sources() if module_name(p) != FACE and layer_of(module_name(p)) is None]


def test_imports_go_down_the_layers() -> None:
    bad = [b for p in sources() for b in upward(module_name(p), p.read_text(), str(p.relative_to(ROOT)))]
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize(("module", "layer"), [("tilert.runtime.persistent.step", "runtime"),
                                               ("tilert.passes.tile", "passes"), ("tilert.abi", "abi")])  # fmt: skip
def test_layer_lookup(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)][0] == layer


def test_upward_and_test_imports_are_caught() -> None:
    src = "import torch\nfrom tilert.ops import norm\n\n\ndef f():\n    from tilert.runtime.persistent import step\n"
    assert upward("tilert.kernels.probe", src, "probe.py") == [
        "probe.py:6 (kernels) imports tilert.runtime.persistent (runtime)",
        "probe.py:6 (kernels) imports tilert.runtime.persistent.step (runtime)",
    ]
    assert upward("tilert.runtime.probe", "from tilert.passes.tile import gemm_shape\n", "probe.py") == [
        "probe.py:1 (runtime) imports tilert.passes.tile, which it must not",
        "probe.py:1 (runtime) imports tilert.passes.tile.gemm_shape, which it must not",
    ]
    assert upward("benchmarks.probe", "from tests.kernels import helpers\n", "probe.py") == [
        "probe.py:1 imports the test module tests.kernels",
        "probe.py:1 imports the test module tests.kernels.helpers",
    ]
