"""The package's folders are its layers and imports run one way, down (docs/architecture.md)."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "robustnas"
# bottom to top; a module may import from its own layer and the layers before it
LAYERS = ["core", "data", "nets", "robustness", "training", "evaluation", "search", "results", "app"]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert loose == [], f"modules outside a layer folder: {loose}"
    assert folders == sorted(LAYERS)


def test_imports_run_down_the_layers():
    upward = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        if len(rel) < 2:
            continue
        mine = LAYERS.index(rel[0])
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] != "robustnas":
                continue
            if len(parts) < 2 or parts[1] not in LAYERS:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} (not a layer)")
            elif LAYERS.index(parts[1]) > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} (a layer above {rel[0]})")
    assert upward == []


def test_the_layer_checker_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "robustnas"
    for layer in LAYERS:
        (fake / layer).mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("from robustnas.app.cli import app\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    try:
        test_imports_run_down_the_layers()
    except AssertionError as e:
        assert "core/bad.py:1 imports robustnas.app.cli" in str(e)
    else:
        raise AssertionError("an upward import went unnoticed")


def test_architecture_doc_draws_the_same_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    drawn = re.findall(r"^\s*\d\s+robustnas/(\w+)/", doc, re.M)
    assert drawn == LAYERS[::-1], "docs/architecture.md's layer picture (top to bottom) differs from the package"
