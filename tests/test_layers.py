"""The package layout keeps its dependency order: data -> stofm -> stalign models -> training -> tasks -> lab ->
commands (``stalign.lab``: synthetic slides, the ablation and the demo stages; only commands import it).

Every import statement of ``stalign/`` and ``stofm/`` (module level, inside functions and under TYPE_CHECKING) is
read with ``ast``; an import that points up the order, out of standalone ``stofm`` into ``stalign``, or that
closes a circle between modules fails here with the file and line.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stalign", "stofm")

#: (module prefix, layer, name); the first matching prefix wins. A module may import its own layer or below.
LAYERS = (
    ("stofm.util", 0, "stofm.util (shared utilities)"),
    ("stalign.data", 1, "stalign.data"),
    ("stofm", 2, "stofm"),
    ("stalign.models", 3, "stalign.models"),
    ("stalign.training", 4, "stalign.training"),
    ("stalign.tasks", 5, "stalign.tasks"),
    ("stalign.lab", 6, "stalign.lab"),
    ("stalign.commands", 7, "stalign.commands"),
    ("stalign.cli", 7, "stalign.commands"),
    ("stalign.__main__", 7, "stalign.commands"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) of every import in the file, resolved to the deepest known module."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            if target.split(".")[0] not in PACKAGES:
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                found.append((target, node.lineno))
                break  # from X import a, b: one edge to the deepest module
    return found


def _layer(module: str) -> tuple[int, str] | None:
    for prefix, rank, label in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank, label
    return None


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    mods = _modules()
    return mods, {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if _layer(m) is None and m not in PACKAGES]
    assert not unplaced, f"modules outside the layered folders (move them into one): {unplaced}"


def test_the_lab_sits_between_tasks_and_commands():
    """Synthetic slides, the ablation and the demo stages (``stalign.lab``) use the tasks; only commands use them."""
    tasks, lab, commands = (_layer(m)[0] for m in ("stalign.tasks.bench", "stalign.lab.synth", "stalign.commands.demo"))
    assert tasks < lab < commands


def test_no_import_points_up_the_order():
    mods, graph = _graph()
    bad = []
    for src, edges in graph.items():
        for dst, line in edges:
            where = f"{mods[src].relative_to(REPO)}:{line} imports {dst}"
            if src.split(".")[0] == "stofm" and dst.split(".")[0] == "stalign":
                bad.append(f"{where} (stofm stands alone: it never imports stalign)")
                continue
            if dst in PACKAGES:  # the root packages: lazy names and __version__ only
                continue
            s, d = _layer(src), _layer(dst)
            if s is not None and d is not None and d[0] > s[0]:
                bad.append(f"{where} ({s[1]} may not import {d[1]}, a higher layer)")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    mods, graph = _graph()
    edges = {src: sorted({dst for dst, _ in out if dst not in PACKAGES}) for src, out in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a data module importing training, and two modules importing each other."""
    (tmp_path / "stalign" / "data").mkdir(parents=True)
    (tmp_path / "stalign" / "training").mkdir()
    (tmp_path / "stofm").mkdir()
    for pkg in ("stalign", "stalign/data", "stalign/training", "stofm"):
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "stalign" / "data" / "a.py").write_text("def f():\n    from stalign.training.t import x\n")
    (tmp_path / "stalign" / "training" / "t.py").write_text("from ..data import a\nx = 1\n")
    (tmp_path / "stofm" / "m.py").write_text("import stalign.data.a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError, match=r"stalign/data/a.py:2 imports stalign.training.t"):
        test_no_import_points_up_the_order()
    with pytest.raises(AssertionError, match="stofm stands alone"):
        test_no_import_points_up_the_order()
    with pytest.raises(AssertionError, match=r"\['stalign.data.a', 'stalign.training.t'\]"):
        test_no_import_circles()


def test_using_stofm_never_imports_stalign(squidpy_crop, tmp_path):
    """Model, tokenizer, embedding and pretraining entry points of stofm run with no stalign module loaded."""
    script = textwrap.dedent(f"""
        import sys
        import anndata as ad
        import stofm
        from stofm.cli import main
        from stofm.pretrain import load_config, pretrain
        from stofm.tokenize import RankValueTokenizer  # noqa: F401

        h5ad = {str(squidpy_crop / "test_data.h5ad")!r}
        adata = ad.read_h5ad(h5ad)
        model = stofm.create_model("stofm-tiny", genes=list(adata.var_names))
        stofm.embed(adata, model, batch_size=4)
        cfg = load_config({str(REPO / "configs" / "stofm_tiny.yaml")!r}, data=[h5ad], output_dir={str(tmp_path)!r},
                          max_steps=1, save_every=0, progress=False)
        pretrain(cfg)
        assert main(["embed", h5ad, "--model", "stofm-tiny", "--out", {str(tmp_path / "e.h5ad")!r}]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "stalign")
        assert not loaded, loaded
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
