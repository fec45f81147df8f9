"""The package's shape: the layers of the loss library in folders of their own, imports that
point one way, and the applications (trainer, integrations) on the public API only.

    unisd_fast/            the API: __init__ (public names), config, losses, linear,
                           validation, reference
    unisd_fast/ops/        the autograd layer: Functions, the fused-linear op, the chunk loop,
                           the length-N step
    unisd_fast/backends/   the row passes: protocol, choice, pytorch/, triton/, stable forms
    unisd_fast/train/      the trainer          unisd_fast/integrations/  TRL

Rules: backends import only backends and config; ops only ops, backends and config; config
nothing of the package; nothing of the library imports the trainer or the integrations; the
integrations never import the trainer; the trainer and the integrations import only the
package itself (its public names) and config.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unisd_fast"
APPLICATIONS = ("unisd_fast.train", "unisd_fast.integrations")
CONFIG = "unisd_fast.config"
FOLDERS = ("ops", "backends", "train", "integrations")


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


def layer(name: str) -> str:
    """The layer of a module: its folder under unisd_fast, or "api" at the top."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "api"


def imports_of(graph, kind):
    return {(name, t) for name, targets in graph.items() if layer(name) == kind for t in targets}


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_layers_are_folders():
    graph = import_graph()
    assert layer("unisd_fast.backends.pytorch.passes") == "backends"
    assert layer("unisd_fast.ops.fused") == "ops"
    assert layer("unisd_fast.losses") == layer("unisd_fast") == "api"
    assert {layer(n) for n in graph} == {"api", "ops", "backends", "train", "integrations"}


def test_backends_import_only_backends_and_config():
    wrong = {(n, t) for n, t in imports_of(import_graph(), "backends")
             if layer(t) != "backends" and t != CONFIG}
    assert not wrong, wrong


def test_ops_import_only_ops_backends_and_config():
    wrong = {(n, t) for n, t in imports_of(import_graph(), "ops")
             if layer(t) not in ("ops", "backends") and t != CONFIG}
    assert not wrong, wrong


def test_config_imports_nothing_of_the_package():
    assert not import_graph()[CONFIG]


def test_library_never_imports_the_trainer_or_the_integrations():
    for name, targets in import_graph().items():
        if name.startswith(APPLICATIONS):
            continue
        wrong = {t for t in targets if t.startswith(APPLICATIONS)}
        assert not wrong, f"{name} imports {wrong}"


def test_integrations_never_import_the_trainer():
    wrong = {(n, t) for n, t in imports_of(import_graph(), "integrations") if layer(t) == "train"}
    assert not wrong, wrong


def test_applications_use_only_the_public_package_and_config():
    graph = import_graph()
    for kind in ("train", "integrations"):
        wrong = {(n, t) for n, t in imports_of(graph, kind)
                 if layer(t) == "api" and t not in ("unisd_fast", CONFIG)
                 or layer(t) in ("ops", "backends")}
        assert not wrong, wrong


def test_reference_imports_only_the_config_and_the_stable_math():
    graph = import_graph()
    assert graph["unisd_fast.reference"] == {CONFIG, "unisd_fast.backends.stable"}
    assert not {t for t in graph["unisd_fast.backends.stable"] if t.startswith("unisd_fast")}


def _loaded_after(statement: str, prefixes) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print([m for m in sys.modules if m.split('.')[0] in {prefixes!r}"
            " or m.startswith('unisd_fast.train')])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip())


def test_import_loads_neither_transformers_nor_the_trainer():
    assert _loaded_after("import unisd_fast", ("transformers", "peft")) == []
    assert _loaded_after("import unisd_fast; unisd_fast.unisd_loss",
                         ("transformers", "peft")) == []


def test_the_config_loads_no_torch():
    assert _loaded_after("import unisd_fast.config", ("torch", "triton")) == []
