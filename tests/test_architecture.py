"""The package's layering, read from its source: every import (module level or inside a
function) goes down the table of layers or sideways within one subpackage, there is no import
circle, and the entry points load only what their layer needs (checked in a fresh process)."""

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mqt_jax"

# Bottom to top. A module may import its own subpackage and anything in a lower layer.
LAYERS = (
    ("config",),
    ("core",),
    ("data", "models", "compressors"),
    ("interop", "run"),
    ("inference",),
    ("evaluation",),
    ("training", "serving"),
    ("research",),
    ("aot",),
    ("cli",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# models and compressors are one layer: the VLM builds a compressor, a compressor uses layers.
# data reads the splice and the m sampler's settings only.
TRAINING_ONLY = ("mqt_jax.training", "mqt_jax.data.shapes", "mqt_jax.data.pipeline",
                 "mqt_jax.evaluation", "mqt_jax.research", "mqt_jax.interop")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mqt_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            if base.startswith("mqt_jax"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                          for a in node.names}
    return found - {name}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mqt_jax"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_is_in_a_layer():
    unplaced = sorted({layer(m) for m in modules()} - set(RANK) - {"mqt_jax"})
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_imports_go_down_the_layers():
    upward = [f"{m} -> {d}" for m, deps in graph().items() if m != "mqt_jax" for d in deps
              if d != "mqt_jax" and RANK[layer(d)] > RANK[layer(m)]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    edges, state, cycles = graph(), defaultdict(int), []

    def visit(node, stack):
        state[node] = 1
        for dep in edges.get(node, ()):
            if state[dep] == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif state[dep] == 0:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if state[node] == 0:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_at_most_five_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 5, loose


def loaded_after(code: str) -> list[str]:
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('mqt_jax'))))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_config_loads_nothing_else_of_the_package():
    assert loaded_after("import mqt_jax.config") == ["mqt_jax", "mqt_jax.config"]


@pytest.mark.parametrize("code", ["import mqt_jax; mqt_jax.load",
                                  "import mqt_jax.run",
                                  "import mqt_jax.serving.server"])
def test_opening_a_run_for_inference_loads_nothing_of_training(code):
    loaded = loaded_after(code)
    assert "mqt_jax.run" in loaded or "server" in code
    assert not [m for m in loaded if m.startswith(TRAINING_ONLY)], loaded
