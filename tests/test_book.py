"""The book's notebooks as code: layout rules, the Colab cell, and device-agnostic teaching code.

The device check runs the chapters' teaching functions on ``meta`` tensors (shapes, no data)
under a mode that fails when one operation mixes tensors of two devices: a tensor created
without ``device=`` lands on the CPU and is caught, as it would fail on a reader's GPU.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def python_only(source: str) -> str:
    """A cell without its IPython lines (magics, shell escapes)."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))


def test_every_chapter_is_found():
    names = {p.stem for p in CHAPTERS}
    assert {"01_federated_learning", "05_gmm_detection", "skymask_costs"} <= names


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_fits_the_page_and_uses_the_package(path):
    for source in code_cells(path):
        assert "NBVAL_" not in source, f"{path.name}: use the nbval cell tags, not a comment"
        assert "RoundContext(" not in source, f"{path.name}: use fl.round_context or toy_context"
        wide = [line for line in source.splitlines() if len(line) > 88]
        assert not wide, f"{path.name}: code lines over 88 characters: {wide}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_ends_with_exercises(path):
    cells = json.loads(path.read_text())["cells"]
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert re.search(r"^## Exercises$", markdown, re.M), f"{path.name} has no Exercises section"
    assert ":class: dropdown" in markdown, f"{path.name}: solutions should be hidden (dropdown)"


def _colab_module():
    spec = importlib.util.spec_from_file_location("colab_cell", ROOT / ".ci" / "colab_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_colab_cell_is_derived_from_the_config(path):
    colab = _colab_module()
    url = colab.repository_url()
    expected = colab.colab_cell_source(url)
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first = cells[0]
    assert "".join(first["source"]) == expected, f"{path.name}: run python .ci/colab_cell.py"
    assert "nbval-skip" in first["metadata"].get("tags", [])
    assert url in expected and "raise SystemExit" in expected


def test_colab_cell_reads_the_url_from_the_config(tmp_path):
    colab = _colab_module()
    config = tmp_path / "_config.yml"
    config.write_text("repository:\n  url: https://example.org/someone/fork/\n")
    assert colab.repository_url(config) == "https://example.org/someone/fork"
    config.write_text("title: no repository\n")
    with pytest.raises(ValueError, match="repository: url"):
        colab.repository_url(config)


class OneDevice(TorchFunctionMode):
    """Fail when one torch operation receives tensors (of one dimension or more) on two devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        devices = {leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
        if len(devices) > 1:
            raise RuntimeError(f"{func.__name__ if hasattr(func, '__name__') else func} mixes devices {devices}")
        return func(*args, **kwargs)


def teaching_functions(path: Path, names: set[str]) -> dict:
    """The chapter's functions ``names``, defined in a namespace that holds its imports."""
    namespace: dict = {}
    sources = [python_only(s) for s in code_cells(path)]
    imports = next(s for s in sources if "import torch" in s and "SEED" in s)
    exec(compile(imports, f"{path.name}:imports", "exec"), namespace)
    for source in sources:
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                exec(compile(ast.Module([node], []), f"{path.name}:{node.name}", "exec"), namespace)
    missing = names - namespace.keys()
    assert not missing, f"{path.name} no longer defines {missing}"
    return namespace


def run_on_meta(function, *args):
    """``function(*args)`` with every tensor argument on ``meta``; its tensors must stay there."""
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with OneDevice():
        out = function(*meta)
    leaves, _ = tree_flatten(out)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            assert leaf.device.type == "meta", f"{function.__name__} returned a tensor on {leaf.device}"
    return out


U = torch.randn(20, 30)
MASKS = torch.rand(21, 40) > 0.5
TEACHING = {
    "03_robust_aggregation": {
        "median_by_hand": (U,),
        "trimmed_mean_by_hand": (U, 4),
        "krum_scores_by_hand": (U, 4),
        "fltrust_by_hand": (U, U[0]),
        "pca2": (U,),
    },
    "05_gmm_detection": {
        "pca_by_gram": (MASKS,),
        "pca_by_svd": (MASKS,),
    },
}


@pytest.mark.parametrize("chapter", sorted(TEACHING))
def test_teaching_code_creates_tensors_on_its_inputs_device(chapter):
    functions = TEACHING[chapter]
    namespace = teaching_functions(ROOT / "book" / f"{chapter}.ipynb", set(functions))
    for name, args in functions.items():
        run_on_meta(namespace[name], *args)


def test_the_device_check_catches_a_cpu_only_tensor():
    """Chapter 5's pca_by_gram before the fix built its centring matrix on the CPU."""
    namespace = {"torch": torch}
    exec(
        "def old_pca_by_gram(b):\n"
        "    x = b.float()\n"
        "    G = (x @ x.T).double()\n"
        "    k = G.shape[0]\n"
        "    H = torch.eye(k, dtype=torch.float64) - 1.0 / k\n"
        "    eigval, eigvec = torch.linalg.eigh(H @ G @ H)\n"
        "    return eigvec[:, [-1, -2]] * eigval[[-1, -2]].clamp_min(0).sqrt()\n",
        namespace,
    )
    with pytest.raises(RuntimeError, match="mixes devices"):
        run_on_meta(namespace["old_pca_by_gram"], MASKS)
