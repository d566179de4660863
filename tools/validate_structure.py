"""Import every package and compose every model x loss config; exit non-zero on the first problem.

python tools/validate_structure.py
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACKAGES = ("training", "core", "storage", "tools")


def main() -> int:
    from training.config import available, compose_config

    failures = []
    for package in PACKAGES:
        if not (REPO / package / "__init__.py").exists():
            continue
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            if info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as err:  # report every broken module, not just the first
                failures.append(f"import {info.name}: {err!r}")
    combos = [(m, loss) for m in available("model") for loss in available("loss")]
    for model, loss in combos:
        try:
            compose_config(model=model, loss=loss)
        except Exception as err:
            failures.append(f"compose model={model} loss={loss}: {err!r}")
    for line in failures:
        print("FAIL", line)
    print(
        f"{len(combos)} configs composed, packages {', '.join(PACKAGES)} imported: {'OK' if not failures else 'FAILED'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
