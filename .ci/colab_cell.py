"""Write the Colab install cell into every chapter, from the one repository URL in _config.yml.

    python .ci/colab_cell.py          # rewrite the cell in every book/*.ipynb
    python .ci/colab_cell.py --check  # exit 1 if a chapter's cell differs (what CI runs)

The cell is each notebook's first code cell, tagged ``nbval-skip`` (it runs on Colab only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
MARKER = "# Colab only:"


def repository_url(config: Path = ROOT / "_config.yml") -> str:
    """The book's repository URL, ``repository: url`` in ``_config.yml``."""
    url = (yaml.safe_load(config.read_text()).get("repository") or {}).get("url")
    if not url:
        raise ValueError(f"{config}: no 'repository: url' to clone on Colab; add one")
    return url.rstrip("/")


def colab_cell_source(url: str) -> str:
    """The install cell: clone, install, and a clear message instead of a traceback."""
    return f'''{MARKER} fetch the repository (package and results files) and install it.
import subprocess
import sys
from pathlib import Path

# _config.yml, repository: url
REPO_URL = "{url}"
CLONE = Path("/content/skymask-lite")
if "google.colab" in sys.modules:
    if not CLONE.exists():
        git = ["git", "clone", "-q", "--depth", "1", REPO_URL, str(CLONE)]
        done = subprocess.run(git, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(
                f"Could not clone {{REPO_URL}} ({{done.stderr.strip()}}). Check that the "
                "runtime is online and the address is right, or upload the repository "
                "to /content/skymask-lite yourself; then run this cell again."
            )
    pip = [sys.executable, "-m", "pip", "install", "-q", str(CLONE)]
    subprocess.run(pip, check=True)  # Colab's own torch and torchvision are kept
    sys.path.insert(0, str(CLONE))'''


def install_cell_index(nb) -> int:
    """Index of the notebook's first code cell (where the install cell belongs)."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            return i
    raise ValueError("the notebook has no code cell")


def notebooks() -> list[Path]:
    return sorted((ROOT / "book").glob("*.ipynb"))


def main(argv: list[str]) -> int:
    source = colab_cell_source(repository_url())
    stale = []
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        cell = nb.cells[install_cell_index(nb)]
        tags = cell.metadata.get("tags", [])
        if cell.source == source and "nbval-skip" in tags:
            continue
        stale.append(path.name)
        if "--check" not in argv:
            cell.source = source
            cell.metadata["tags"] = sorted({*tags, "nbval-skip"})
            cell.outputs, cell.execution_count = [], None
            nbformat.write(nb, path)
    if stale and "--check" in argv:
        print(f"Colab cell out of date in {stale}: run python .ci/colab_cell.py")
        return 1
    print("rewrote" if stale else "up to date:", ", ".join(stale) or "every chapter")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
