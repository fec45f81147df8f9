"""The package's shape: the loss library loads without the trainer, imports form no cycle,
and dependencies point one way (library -> trainer, never back)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unisd_fast"
APPLICATIONS = ("unisd_fast.train", "unisd_fast.integrations")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the unisd_fast modules it imports anywhere in its code (functions too)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_relative_and_absolute_imports():
    graph = import_graph()
    assert "unisd_fast.train.config" in graph["unisd_fast.train.loop"]
    assert "unisd_fast" in graph["unisd_fast.train.step"]  # from .. import unisd_loss
    assert "unisd_fast.config" in graph["unisd_fast.reference"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_library_never_imports_the_trainer():
    for name, targets in import_graph().items():
        if name.startswith(APPLICATIONS):
            continue
        wrong = {t for t in targets if t.startswith(APPLICATIONS)}
        assert not wrong, f"{name} imports {wrong}"


def test_reference_imports_only_the_config_and_the_stable_math():
    graph = import_graph()
    assert graph["unisd_fast.reference"] == {"unisd_fast.config", "unisd_fast.stable"}
    assert not {t for t in graph["unisd_fast.stable"] if t.startswith("unisd_fast")}


def test_import_loads_neither_transformers_nor_the_trainer():
    code = (
        "import sys, unisd_fast\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft')"
        " or m.startswith('unisd_fast.train')]\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
