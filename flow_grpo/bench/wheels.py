"""Install the wheels shipped beside the GPU check for packages a bare GPU machine lacks.

    python3 -m flow_grpo.bench.wheels scripts/wheels

GPU machines often have torch and transformers only. `scripts/gpu_check.sh` runs this first: for
every module of `REQUIRED` that does not import, the matching wheel of the directory (if any) is
installed with pip, offline and without dependencies (torch must not be replaced). Standard
library only, so it runs before anything else is importable.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["REQUIRED", "install_missing", "wheels_to_install"]

REQUIRED: dict[str, str] = {
    "diffusers": "diffusers",
    "ml_collections": "ml_collections",
    "absl": "absl_py",
    "peft": "peft",
    "accelerate": "accelerate",
}
"""Module -> distribution name (as wheel file names spell it) the check imports beyond torch and transformers."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheels_to_install(directory: Path, missing: list[str]) -> tuple[list[Path], list[str]]:
    """The wheels of `directory` for the `missing` modules, and the modules no wheel there provides."""
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    chosen, unmatched = [], []
    for module in missing:
        dist = _normalise(REQUIRED[module])
        match = [w for w in wheels if _normalise(w.name.split("-", 1)[0]) == dist]
        if match:
            chosen.append(match[-1])  # the highest version in name order
        else:
            unmatched.append(module)
    return chosen, unmatched


def install_missing(directory: Path) -> int:
    """Install the wheels for the modules of `REQUIRED` that do not import; 1 when some stay missing."""
    missing = [module for module in REQUIRED if importlib.util.find_spec(module) is None]
    if not missing:
        return 0
    chosen, unmatched = wheels_to_install(directory, missing)
    if chosen:
        print(f"installing {', '.join(w.name for w in chosen)} from {directory}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *map(str, chosen)], check=True)
    if unmatched:
        print(f"missing and not shipped in {directory}: {', '.join(unmatched)} (pip install them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(install_missing(Path(sys.argv[1] if len(sys.argv) > 1 else "scripts/wheels")))
