"""The house's arrows, checked from the source: pages -> ui -> engine; engine never imports the
app; only ``ui/st_*.py``, the pages and ``app.py`` import Streamlit; no import circle inside
engine; the registries import no family."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ENGINE = sorted((ROOT / "engine").rglob("*.py"))


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_never_imports_the_app(path):
    bad = {m for m in imports(path) if m.split(".")[0] in ("streamlit", "ui", "pages", "app")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "ui").glob("*.py")), ids=lambda p: p.name)
def test_only_st_modules_of_ui_import_streamlit(path):
    uses = any(m.split(".")[0] == "streamlit" for m in imports(path))
    assert uses == path.name.startswith("st_"), (
        f"{path.name}: {'imports' if uses else 'does not import'} streamlit; its name says "
        "otherwise (st_*.py are the Streamlit services)")


def test_no_import_circle_inside_engine():
    modules = {module_name(p): p for p in ENGINE}
    # A package importing its own submodules (to fill a registry) is not a dependency back.
    graph = {name: {m for m in imports(path)
                    if m in modules and m != name and m.rsplit(".", 1)[0] != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("registry, families", [
    ("engine/models/registry.py", ("engine.models.backbones", "engine.models.heads")),
    ("engine/data/registry.py", ("engine.data.cifar", "engine.data.coco", "engine.data.digits",
                                 "engine.data.image_folder", "engine.data.svhn",
                                 "engine.data.tiny_imagenet")),
])
def test_registries_import_no_family(registry, families):
    assert not imports(ROOT / registry) & set(families)


def test_cli_entry_is_small_and_no_engine_function_is_long():
    assert len((ROOT / "engine" / "__main__.py").read_text().splitlines()) < 100
    long = []
    for path in ENGINE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_help_and_configs_do_not_load_torch():
    """``python -m engine --help``, config validation and MilConfig stay light (0.08 s, not the
    3 s of importing torch): the heavy modules load where a command needs them."""
    import subprocess
    import sys

    code = ("import sys; from engine.cli import build_parser; build_parser(); "
            "from engine.config import RunConfig; RunConfig(); "
            "from engine.mil.config import MilConfig; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
