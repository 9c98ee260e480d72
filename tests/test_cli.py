"""The command line: every bad input stops with one `error:` line and exit code 2 before any
compute, the help teaches (choices, meanings, examples), the collapse of a model is a result."""

import dataclasses
import json
import sys

import pytest

from skymask_lite import data, experiments
from skymask_lite.__main__ import main
from skymask_lite.attacks import ATTACKS
from skymask_lite.defenses import DEFENSES
from skymask_lite.experiments import Config

TINY = ["--model", "lr", "--num-clients", "10", "--train-size", "3000", "--rounds", "2", "--local-lr", "0.05",
        "--no-progress"]


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the run loads data or trains a round."""
    monkeypatch.setattr(experiments, "load_dataset", lambda *a, **k: pytest.fail("loaded the data"))
    monkeypatch.setattr(experiments, "run_round", lambda *a, **k: pytest.fail("trained a round"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--out", "/proc/x.json"], "--out /proc/x.json"),
        (["--out", "/dev/null/sub/x.json"], "--out /dev/null/sub/x.json"),
        (["--bias", "1.5"], "--bias 1.5"),
        (["--alpha", "-1", "--split", "dirichlet"], "--alpha"),
        (["--root-bias", "2"], "--root-bias"),
        (["--root-size", "0"], "--root-size"),
        (["--train-size", "5"], "--train-size"),
        (["--device", "tpu"], "--device tpu"),
        (["--threads", "0"], "--threads 0"),
        (["--engine", "fast"], "--engine fast"),
        (["--num-malicious", "10"], "--num-malicious 10"),
        (["--attack", "teleport"], "--attack teleport"),
        (["--defense", "magic"], "--defense magic"),
        (["--defense", "multi_krum", "--defense-option", "m=x"], "--defense-option m=x"),
        (["--attack", "gaussian", "--attack-option", "sigma=big"], "--attack-option sigma=big"),
        (["--bias", "abc"], "--bias"),
        (["--rounds", "1.5"], "--rounds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_compute(argv, flag, capsys, no_compute, tmp_path):
    argv = [*TINY, "--out", str(tmp_path / "x.json"), *argv]
    assert main(["run", *argv]) == 2
    assert flag in one_error_line(capsys)


def test_the_output_folder_is_created_and_checked(tmp_path, no_compute, capsys):
    (tmp_path / "file").write_text("")
    assert main(["run", *TINY, "--out", str(tmp_path / "file" / "x.json")]) == 2
    assert "--out" in one_error_line(capsys)
    assert main(["run", *TINY, "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert main(["grid", *TINY, "--out-dir", str(tmp_path / "file")]) == 2
    assert "--out-dir" in one_error_line(capsys)
    created = experiments.check_output(tmp_path / "a" / "b" / "x.json")
    assert created.parent.is_dir() and list(created.parent.iterdir()) == []


def test_skymask_data_pointing_nowhere_is_an_error(monkeypatch, capsys, tmp_path, no_compute):
    monkeypatch.setenv("SKYMASK_DATA", str(tmp_path / "nonexistent"))
    with pytest.raises(FileNotFoundError, match="SKYMASK_DATA="):
        data.data_dirs()
    assert main(["run", *TINY, "--out", str(tmp_path / "x.json")]) == 2
    assert "SKYMASK_DATA=" in one_error_line(capsys) and not (tmp_path / "x.json").exists()


def test_cifar_missing_says_the_download_was_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "nothing")
    monkeypatch.delenv("SKYMASK_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    tried = data._missing_message("cifar10", [tmp_path], download_tried=True)
    assert "download failed" in tried and "download=True" not in tried and "\n" not in tried
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        data.locate_dataset("cifar10", tmp_path, download=False)
    assert "\n" not in str(err.value)


def test_a_grid_checks_every_config_before_the_first_run(tmp_path, capsys, no_compute):
    assert main(["grid", *TINY, "--bias", "0.5", "2", "--out-dir", str(tmp_path)]) == 2
    assert "--bias 2" in one_error_line(capsys)


def test_help_lists_the_choices_the_meanings_and_examples(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/skymask-lite"])
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in [*ATTACKS, *DEFENSES, "fmnist", "cifar10", "resnet20", "parallel", "batched", "dirichlet"]:
        assert name in text
    for f in dataclasses.fields(Config):  # each flag says what its field means, from the one source
        assert " ".join(f.metadata["help"].split()) in text
    assert text.startswith("usage: skymask-lite run") and text.count("skymask-lite run --") >= 3
    assert "``" not in text and ":class:" not in text and "defence" not in text
    monkeypatch.setattr(sys, "argv", ["/x/skymask_lite/__main__.py"])
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m skymask_lite")


def test_every_config_field_is_a_flag():
    flags = {action.dest for action in _run_parser()._actions}
    fields = {f.name for f in dataclasses.fields(Config)} - {"attack_options", "defense_options"}
    assert fields <= flags and {"attack_option", "defense_option", "no_resume", "threads", "out"} <= flags


def _run_parser():
    from skymask_lite.__main__ import _parser

    parser = _parser()
    return next(a for a in parser._actions if a.dest == "command").choices["run"]


def test_run_without_out_writes_to_results_in_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY, "--rounds", "1", "--threads", "1"]) == 0
    (written,) = (tmp_path / "results").glob("*.json")
    assert json.loads(capsys.readouterr().out)["out"] == str(written.relative_to(tmp_path))
    results = json.loads(written.read_text())
    assert results["env"]["threads"] == 1 and written.stem == experiments.run_name(Config(**results["config"]))


def test_a_collapse_under_attack_exits_0_with_a_notice(tmp_path, capsys):
    out = tmp_path / "g.json"
    argv = ["run", *TINY, "--rounds", "5", "--num-malicious", "2", "--attack", "gaussian",
            "--attack-option", "sigma=1e37", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    notice = captured.err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith("notice: the global model collapsed in round")
    assert json.loads(captured.out)["collapsed"] == json.loads(out.read_text())["final"]["collapsed"]


def test_a_checkpoint_of_another_commit_is_refused_and_no_resume_restarts(
    tmp_path, monkeypatch, capsys, interrupt_round
):
    out = tmp_path / "r.json"
    restore = interrupt_round(2)
    with pytest.raises(KeyboardInterrupt):
        main(["run", *TINY, "--out", str(out)])
    restore()
    real_version = experiments.code_version
    monkeypatch.setattr(experiments, "code_version", lambda: {**real_version(), "git_commit": "0" * 40})
    assert main(["run", *TINY, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "--no-resume" in line and "commit 000000000000" in line and not out.exists()
    assert main(["run", *TINY, "--out", str(out), "--no-resume"]) == 0
    assert json.loads(out.read_text())["env"]["git_commit"] == "0" * 40
