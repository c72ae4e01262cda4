"""The layout docs/architecture.md describes, held by reading jaxft's source: who may import whom,
no import circle, and one resolver of the config.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxft"

# The rooms, lowest first: a module imports only from its own room or a lower one (function-level
# imports included). The package root (`jaxft/__init__.py`, the public API) may import anything.
ROOMS = {
    "base": ("jaxft.errors", "jaxft.dtypes", "jaxft.tasks", "jaxft.target", "jaxft.progress",
             "jaxft.sharding", "jaxft.outdir", "jaxft.cli", "jaxft.wandb_log"),
    "kernels": ("jaxft.kernels",),
    "models": ("jaxft.models",),
    "adapt": ("jaxft.lora", "jaxft.quant", "jaxft.dpo", "jaxft.grpo", "jaxft.rewards",
              "jaxft.optim"),
    "hf": ("jaxft.hf",),
    "data": ("jaxft.data",),
    "config": ("jaxft.config", "jaxft.spec"),
    "run": ("jaxft.train_step", "jaxft.checkpoint", "jaxft.metrics", "jaxft.early_stopping",
            "jaxft.preemption", "jaxft.workdir", "jaxft.evaluate", "jaxft.generate",
            "jaxft.export", "jaxft.plot", "jaxft.rollout"),
    "plan": ("jaxft.plan",),
    "commands": ("jaxft.train", "jaxft.convert"),
}
ORDER = list(ROOMS)


def module_files() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


MODULES = module_files()


def imports_of(name: str) -> set[str]:
    """The jaxft modules `name` imports anywhere in its file (top level or inside functions);
    `from jaxft.x import y` counts as importing `jaxft.x.y` when that is a module, else
    `jaxft.x`."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [s for s in subs if s in MODULES]
            if len(targets) < len(subs):
                targets.append(node.module)
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("jaxft") and target != name:
                found.add(target)
    return found


def room_of(name: str) -> str:
    for room, prefixes in ROOMS.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return room
    raise AssertionError(f"{name} is in no room: add it to docs/architecture.md and ROOMS")


GRAPH = {name: imports_of(name) for name in MODULES}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a higher room than its own."""
    return [f"{name} ({room_of(name)}) imports {target} ({room_of(target)})"
            for name, targets in graph.items() if name != "jaxft"
            for target in sorted(targets) if target != "jaxft"
            and ORDER.index(room_of(target)) > ORDER.index(room_of(name))]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of an import graph with more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v] - {"jaxft"}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_room_and_imports_only_downward():
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_no_import_circle():
    assert not circles(GRAPH), circles(GRAPH)


def test_a_circle_and_an_upward_import_would_be_seen():
    """The checks above can fail: the circle lora <-> quant that the layout removed, and a
    model that imported the training loop, are both found in a graph that has them."""
    bad = {name: set(targets) for name, targets in GRAPH.items()}
    bad["jaxft.quant"].add("jaxft.lora")
    bad["jaxft.lora"].add("jaxft.quant")
    bad["jaxft.models.llama"].add("jaxft.train_step")
    assert any({"jaxft.lora", "jaxft.quant"} <= set(circle) for circle in circles(bad))
    assert any(line.startswith("jaxft.models.llama (models) imports jaxft.train_step")
               for line in upward_imports(bad))


# Fields of the raw config that only the resolver (`jaxft.spec`) turns into typed views.
VIEW_FIELDS = re.compile(
    r"\b(c|cfg|config|run_cfg)\.(lora\.(enabled|rank|alpha|dropout|targets|use_rslora|use_dora|"
    r"rank_pattern|modules_to_save|base_quant|quant_block_size|double_quant)|"
    r"dpo\.(beta|loss_type|label_smoothing|precompute_ref)|train\.compute_dtype)\b")
VIEW_CLASSES = ("LoraConfig", "DpoConfig", "QuantConfig")
RESOLVER = ("jaxft.spec", "jaxft.config")
# Where a view's class may be constructed besides the resolver: its own module, `from_pretrained`
# (`quantize="nf4"` from a user's call) and the PEFT import (an adapter_config.json's LoRA).
DEFINED = {"LoraConfig": "jaxft.lora", "DpoConfig": "jaxft.dpo", "QuantConfig": "jaxft.quant"}
ALSO = {("QuantConfig", "jaxft.hf.pretrained"), ("LoraConfig", "jaxft.hf.adapters")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_resolver_builds_views_of_the_config(name):
    if name in RESOLVER:
        return
    source = MODULES[name].read_text()
    reads = [m.group(0) for m in VIEW_FIELDS.finditer(source)
             if not _in_docstring_or_comment(source, m.start())]
    assert not reads, f"{name} reads {reads}: take them from the RunSpec (jaxft.spec)"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = getattr(node.func, "attr", getattr(node.func, "id", None))
            if called in VIEW_CLASSES:
                assert DEFINED[called] == name or (called, name) in ALSO, \
                    f"{name} builds a {called}: the RunSpec has it"


def _in_docstring_or_comment(source: str, offset: int) -> bool:
    line = source[:offset].rsplit("\n", 1)[-1]
    if "#" in line:
        return True
    return source[:offset].count('"""') % 2 == 1


def test_the_architecture_page_names_every_room_and_package():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for room, prefixes in ROOMS.items():
        assert f"**{room}**" in page, room
        for prefix in prefixes:
            assert f"`{prefix.removeprefix('jaxft.').replace('.', '/')}" in page, prefix
