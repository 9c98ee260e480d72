"""The committed benchmark results are what the benchmark script writes, and hold the headline figures."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """A script of ``benchmarks/`` imported as a module (they are not a package; a script
    imports its neighbours by name, as ``python benchmarks/<script>.py`` lets it)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_module():
    return _script("run")


@pytest.fixture(scope="module")
def result():
    return json.loads((BENCH / "results" / "benchmark_cpu.json").read_text())


def test_committed_table_is_generated_from_the_committed_json(run_module, result):
    """Nobody edited the Markdown by hand, and the script's table still reads every key."""
    assert run_module.markdown(result) == (BENCH / "results" / "benchmark_cpu.md").read_text()


def test_headline_figures_follow_from_the_measurements(result):
    rounds = result["rounds"]
    speedup = min(rounds["dataloader_round_seconds"]) / min(rounds["fedavg_round_seconds"])
    assert result["round_speedup_vs_dataloader_loop"] == pytest.approx(speedup, abs=1e-3)
    skymask = rounds["phases"][rounds["engine"]]["skymask"]
    assert result["skymask_server_share_at_100"] == pytest.approx(skymask["defense"] / skymask["total"], abs=1e-4)
    assert not result["env"]["quick"] and result["env"].get("git_dirty") is False


@pytest.fixture(scope="module")
def gpu_check():
    return _script("gpu_check")


def test_committed_cuda_benchmark_agrees_with_its_markdown_and_the_gpu_check(run_module, gpu_check):
    """The GPU files were written together: the Markdown from the JSON, and the GPU check's
    acceptance recomputed from its own report and that JSON gives what it recorded."""
    cuda = json.loads((BENCH / "results" / "benchmark_cuda.json").read_text())
    assert run_module.markdown(cuda) == (BENCH / "results" / "benchmark_cuda.md").read_text()
    report = json.loads((BENCH / "results" / "gpu_check.json").read_text())
    assert gpu_check.acceptance(report, BENCH / "results" / "benchmark_cuda.json") == report["acceptance"]
    skymask = cuda["rounds"]["phases"]["batched"]["skymask"]
    assert report["acceptance"]["skymask_server_share"] == pytest.approx(skymask["defense"] / skymask["total"], abs=1e-4)


def test_committed_server_share_follows_from_its_rounds():
    """The GPU's median share of SkyMask's server step is computed from the rounds it records:
    every SkyMask and FedAvg round's phases, from the same commit and machine."""
    share = _script("server_share")
    saved = json.loads((BENCH / "results" / "server_share_cuda.json").read_text())
    rounds = saved["per_round"]
    assert len(rounds["skymask"]) == len(rounds["fedavg"]) == saved["rounds"]
    assert {k: saved[k] for k in share.summarize(rounds["skymask"], rounds["fedavg"])} == share.summarize(
        rounds["skymask"], rounds["fedavg"])
    assert min(r["defense"] / r["total"] for r in rounds["skymask"]) <= saved["share_median"] <= max(
        r["defense"] / r["total"] for r in rounds["skymask"])
    assert saved["env"]["device"] == "cuda" and saved["env"]["git_dirty"] is False


def test_server_share_summary_is_the_median_round():
    """Medians, not means: one slow round (here 10x) does not move them."""
    share = _script("server_share")
    sky = [{"defense": 0.03, "total": 0.3}, {"defense": 0.04, "total": 0.4}, {"defense": 0.5, "total": 5.0}]
    fed = [{"total": 0.27}, {"total": 0.36}, {"total": 3.0}]
    out = share.summarize(sky, fed)
    assert out["server_seconds_median"] == 0.04 and out["skymask_round_median"] == 0.4
    assert out["share_median"] == 0.1 and out["share_of_fedavg_round"] == 0.1  # 0.04 / (0.36 + 0.04)


def test_markdown_names_the_resnet_round_under_both_cudnn_settings(run_module):
    """A CUDA benchmark's ResNet20 line gives the round with cuDNN's own timing and without."""
    cuda = json.loads((BENCH / "results" / "benchmark_cuda.json").read_text())
    cuda["resnet20_round"].update(seconds=1.5, cudnn_benchmark=True, seconds_other_cudnn_setting=3.25)
    text = run_module.markdown(cuda)
    assert "**1.50 s**" in text and "algorithms timed by cuDNN; with cuDNN's default algorithms: 3.25 s." in text
    cuda["resnet20_round"]["cudnn_benchmark"] = False
    assert "cuDNN's default algorithms; with algorithms timed by cuDNN: 3.25 s." in run_module.markdown(cuda)


def test_gpu_check_acceptance_reads_failures_and_targets(gpu_check, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"resnet20_round": {"clients": 100, "seconds": 3.2},
                                 "skymask_server_share_at_100": 0.08}))
    report = {"benchmark": {}, "notebooks": {"a.ipynb": {"status": "ok"}, "b.ipynb": {"status": "failed"},
                                             "c.ipynb": {"status": "skipped", "error": ["needs x"]}},
              "matrix": {"x": {"status": "ok"}, "y": {"status": "collapsed"}, "z": {"status": "failed"},
                         "w": {"status": "not run (time budget)"}}}
    out = gpu_check.acceptance(report, bench)
    assert (out["chapters_ok"], out["chapters_failed"]) == (["a.ipynb"], ["b.ipynb"])
    assert out["chapters_skipped"] == {"c.ipynb": "needs x"}  # neither ran nor failed
    assert (out["matrix_collapsed"], out["matrix_failures"], out["matrix_not_run"]) == (["y"], ["z"], ["w"])
    assert out["resnet20_round_ok"] is False and out["skymask_share_ok"] is True  # 3.2 s > 3 s; 8% <= 10%
    del report["benchmark"]  # no benchmark in this run: no verdict on its targets
    assert "skymask_share_ok" not in gpu_check.acceptance(report, bench)


def test_gpu_check_packs_only_the_runs_a_study_gained(gpu_check, tmp_path):
    import tarfile

    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "old.json").write_text("{}")
    before = {"share": {"old.json"}}
    (tmp_path / "share" / "new.json").write_text("{}")
    out = tmp_path / "studies.tar.gz"
    assert gpu_check.pack_studies(["share"], tmp_path, before, out) == {"share": {"new_runs": 1, "runs": ["new.json"]}}
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["share/new.json"]


def test_gpu_check_executes_a_notebook_that_never_imports_pyplot(gpu_check, tmp_path):
    """The GPU check's notebook runner: code cells in order in one namespace, shell and magic
    lines dropped, ``nbval-skip`` cells skipped, and no dependence on the chapter importing
    pyplot (chapter 11 without CIFAR does not; the first GPU run of it failed on that)."""
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]},
             {"cell_type": "code", "metadata": {}, "source": ["%matplotlib inline\n", "x = 20\n"]},
             {"cell_type": "code", "metadata": {"tags": ["nbval-skip"]}, "source": ["raise SystemExit"]},
             {"cell_type": "code", "metadata": {}, "source": ["import pathlib\n",
                                                               f"pathlib.Path({str(tmp_path / 'x')!r}).write_text(str(x + 1))"]}]
    path = tmp_path / "chapter.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    gpu_check.execute_notebook(path)
    assert (tmp_path / "x").read_text() == "21"


def test_gpu_check_skips_only_a_chapter_whose_extra_is_missing(gpu_check, tmp_path, monkeypatch):
    """A chapter that imports the Flower package is recorded as skipped, with the missing
    packages named, where Flower or Ray is not installed; it runs where both are; a chapter
    that does not import it (or only in an ``nbval-skip`` cell) always runs."""
    def chapter(name, source, tags=()):
        cells = [{"cell_type": "code", "metadata": {"tags": list(tags)}, "source": [source]}]
        path = tmp_path / name
        path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        return path

    flower = chapter("flower.ipynb", "from skymask_lite.flower import apps")
    colab = chapter("colab.ipynb", "import skymask_lite.flower", tags=["nbval-skip"])
    plain = chapter("plain.ipynb", "import skymask_lite")
    installed = {"flwr"}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name in installed else None)
    why = gpu_check.missing_extra(flower)
    assert "flower extra" in why and why.endswith("not installed: ray")
    assert gpu_check.missing_extra(colab) is None and gpu_check.missing_extra(plain) is None
    installed.add("ray")
    assert gpu_check.missing_extra(flower) is None


def test_gpu_check_refuses_a_copy_whose_git_disagrees_with_commit(gpu_check):
    """A stale .git (another commit, or uncommitted changes) would stamp every run with the
    wrong provenance: the check names the problem and how to fix it; no --commit, no git, or a
    matching clean copy pass."""
    clean = {"git_commit": "1e3324a56c0bddd6", "git_dirty": False}
    assert gpu_check.commit_mismatch("1e3324a", clean) is None
    assert gpu_check.commit_mismatch(None, clean) is None
    assert gpu_check.commit_mismatch("1e3324a", {"git_commit": None, "git_dirty": None}) is None
    stale = gpu_check.commit_mismatch("1e3324a", {"git_commit": "5ba5561db1fd", "git_dirty": True})
    assert "git says 5ba5561db1fd" in stale and "Remove the stale .git" in stale
    dirty = gpu_check.commit_mismatch("1e3324a", {**clean, "git_dirty": True})
    assert "uncommitted changes" in dirty
