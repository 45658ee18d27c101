"""The house's layering rules, checked on the source: leaf packages stay leaves, nothing imports the CLI."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return names


def test_vae3d_never_imports_dit():
    code = "import sys, vae3d, vae3d.loading, vae3d.parallel\nbad = sorted(m for m in sys.modules if m.split('.')[0] == 'dit')\nassert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for path in (ROOT / "vae3d").rglob("*.py"):
        bad = [m for m in _imports(path) if m == "dit" or m.startswith("dit.")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_nothing_in_the_package_imports_the_cli():
    allowed = {ROOT / "dit" / "cli.py", ROOT / "dit" / "__main__.py"}
    for pkg in ("dit", "vae3d", "samplers", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path not in allowed:
                bad = [m for m in _imports(path) if m == "dit.cli" or m.startswith("dit.cli.")]  # also `from dit import cli`
                assert not bad, f"{path.relative_to(ROOT)} imports the command line ({bad})"
