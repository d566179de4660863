"""Layout rules from DESIGN.md that a refactor could silently break."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_python_files_under_data_or_config_folders():
    offenders = [p for folder in ("datasets", "config") for p in (REPO / folder).rglob("*.py")]
    assert offenders == [], f"datasets/ and config/ hold data only, found: {offenders}"


def test_import_datasets_is_huggingface_not_the_repo_folder():
    # Run from the repo root with it on sys.path, the way uvicorn, pytest and Docker do.
    code = "import datasets, sys; print(datasets.__file__); assert hasattr(datasets, 'load_dataset')"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}
    )
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout, out.stdout


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_training_imports_neither_web_nor_firebase():
    for path in (REPO / "training").rglob("*.py"):
        bad = _imported_modules(path) & {
            "fastapi",
            "starlette",
            "firebase_admin",
            "google",
            "core",
            "storage",
            "uvicorn",
        }
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_packages_import():
    for name in ("training", "training.facade", "training.loop", "training.losses", "training.logprobs"):
        importlib.import_module(name)
