import json
import subprocess
from pathlib import Path

import pytest
import torch

from skymask_lite import experiments
from skymask_lite.__main__ import main
from skymask_lite.experiments import Config, grid, load_results, run_experiment, run_name

TINY = dict(model="lr", num_clients=10, train_size=3000, rounds=2, local_lr=0.05)


def test_results_json_has_the_documented_keys(tmp_path):
    out = tmp_path / "r.json"
    results = run_experiment(Config(num_malicious=2, attack="sign_flip", **TINY), out, progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(results) == {"config", "malicious", "rounds", "final", "env"}
    assert results["config"]["seed"] == 0 and len(results["malicious"]) == 2
    record = results["rounds"][0]
    assert {"round", "test_acc", "kept", "seconds", "fpr", "fnr"} <= set(record)
    assert record["fpr"] == 0.0 and record["fnr"] == 1.0  # FedAvg keeps everybody
    assert {"package_version", "git_commit", "torch_version", "device"} <= set(results["env"])
    assert results["final"]["test_acc"] == results["rounds"][-1]["test_acc"]


def test_same_seed_same_results_other_seed_other_results():
    a, b, c = (run_experiment(Config(seed=s, **TINY), progress=False) for s in (1, 1, 2))
    strip = lambda r: [{k: v for k, v in rec.items() if k not in ("seconds", "timing")} for rec in r["rounds"]]
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = Config(rounds=3, **{k: v for k, v in TINY.items() if k != "rounds"})
    straight = run_experiment(config, progress=False)
    real_round, calls = experiments.run_round, []

    def crash_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_round(*args)

    out = tmp_path / "run.json"
    monkeypatch.setattr(experiments, "run_round", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, progress=False)
    assert out.with_suffix(".ckpt.pt").exists() and not out.exists()
    before = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)["wall_seconds"]
    monkeypatch.setattr(experiments, "run_round", real_round)
    resumed = run_experiment(config, out, progress=False)
    assert [r["test_acc"] for r in resumed["rounds"]] == [r["test_acc"] for r in straight["rounds"]]
    assert not out.with_suffix(".ckpt.pt").exists()
    assert resumed["env"]["wall_seconds"] > before > 0  # the wall time of both sessions


def test_finished_results_are_not_recomputed(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    first = run_experiment(Config(**TINY), out, progress=False)
    monkeypatch.setattr(experiments, "build", lambda *a, **k: pytest.fail("recomputed a finished run"))
    assert run_experiment(Config(**TINY), out, progress=False) == json.loads(json.dumps(first))


def test_grid_and_load_results(tmp_path):
    configs = grid(Config(**TINY), seed=[0, 1], attack=["none", "sign_flip"], num_malicious=[2])
    assert len(configs) == 4 and len({run_name(c) for c in configs}) == 4
    experiments.run_grid(configs[:2], tmp_path, progress=False)
    assert len(load_results(tmp_path)) == 2 and len(load_results(tmp_path, attack="sign_flip")) == 1
    with pytest.raises(ValueError, match="unknown config field"):
        grid(Config(), colour=["red"])


def test_cli_run_writes_results(tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = main(["run", "--model", "lr", "--num-clients", "10", "--train-size", "2000", "--rounds", "1",
                 "--attack", "min_max", "--num-malicious", "2", "--defense", "median", "--no-progress",
                 "--attack-option", "perturbation=std", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["config"]["attack_options"] == {"perturbation": "std"}
    assert json.loads(capsys.readouterr().out)["out"] == str(out)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--attack", "teleport"], "unknown attack"),
        (["--defense", "magic"], "unknown defen"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--num-malicious", "10", "--num-clients", "10"], "num_malicious must be in"),
        (["--model", "cnn", "--dataset", "cifar10"], "use 'resnet20'"),
        (["--attack-option", "colour=red", "--attack", "min_max"], "unknown option"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys, tmp_path):
    assert main(["run", "--rounds", "1", "--no-progress", "--out", str(tmp_path / "x.json"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_but_absent_is_an_error(capsys):
    assert main(["run", "--device", "cuda", "--rounds", "1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_environment_records_uncommitted_changes(tmp_path, monkeypatch):
    """git_dirty is what git says of the tracked files, and None outside a repository."""
    calls = []

    def fake_git(*args):
        calls.append(args)
        return {"rev-parse": "abc123", "status": " M skymask_lite/fl.py"}[args[0]]

    monkeypatch.setattr(experiments, "_git", fake_git)
    env = experiments.environment("cpu")
    assert env["git_commit"] == "abc123" and env["git_dirty"] is True
    assert ("status", "--porcelain", "--untracked-files=no") in calls
    monkeypatch.setattr(experiments, "_git", lambda *a: "" if a[0] == "status" else "abc123")
    assert experiments.environment("cpu")["git_dirty"] is False

    def no_repo(*args):
        raise subprocess.CalledProcessError(128, ["git", *args])

    monkeypatch.setattr(experiments, "_git", no_repo)
    env = experiments.environment("cpu")
    assert env["git_commit"] is None and env["git_dirty"] is None


def test_environment_names_the_cpu_model_on_linux():
    env = experiments.environment("cpu")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        expected = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert env["device_name"] == expected.split(":", 1)[1].strip()
    assert env["device_name"] and env["threads"] == torch.get_num_threads()
