"""Shared fixtures: the real Fashion-MNIST (installed by .ci/setup), loaded once per session."""

import pytest
import torch

from skymask_lite.data import load_dataset


@pytest.fixture(scope="session")
def fmnist():
    """``(train, test)`` TensorDatasets of the real Fashion-MNIST."""
    return load_dataset("fmnist", download=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def interrupt_round(monkeypatch):
    """``restore = interrupt_round(k)``: the runner's ``k``-th round raises ``KeyboardInterrupt``
    (a run killed mid-way); ``restore()`` puts the real round back."""
    from skymask_lite import experiments

    real = experiments.run_round

    def arm(k: int):
        calls = []

        def crash(*args):
            calls.append(1)
            if len(calls) == k:
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(experiments, "run_round", crash)
        return lambda: monkeypatch.setattr(experiments, "run_round", real)

    return arm


@pytest.fixture
def fake_cifar(monkeypatch):
    """``fake_cifar(folder, name, num_classes, per_file=6)`` writes tiny files in torchvision's
    CIFAR layout (pickled dicts of uint8 rows, labels ``i % num_classes``) and lets torchvision
    read them (it checks the md5 of the real release files, which tiny files cannot match)."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)

    def write(folder, name, num_classes, per_file=6):
        rng = np.random.default_rng(0)
        label_key = "labels" if name == "cifar10" else "fine_labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
        base = folder / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
        base.mkdir(parents=True)
        for f in files:
            batch = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                     label_key: [i % num_classes for i in range(per_file)]}
            with open(base / f, "wb") as fh:
                pickle.dump(batch, fh)
        meta_key, meta_file = ("label_names", "batches.meta") if name == "cifar10" else ("fine_label_names", "meta")
        with open(base / meta_file, "wb") as fh:
            pickle.dump({meta_key: [f"c{i}" for i in range(num_classes)]}, fh)
        return folder

    return write


@pytest.fixture
def cli_run(tmp_path):
    """``cli_run(*args)``: ``python -m skymask_lite run`` for one round of 10 clients of logistic
    regression on 2,000 images, plus ``args``; checks the exit code and returns the results."""
    import json

    from skymask_lite.__main__ import main

    def run(*args: str) -> dict:
        out = tmp_path / "cli.json"
        code = main(["run", "--model", "lr", "--num-clients", "10", "--train-size", "2000", "--rounds", "1",
                     "--no-progress", *args, "--out", str(out)])
        assert code == 0
        return json.loads(out.read_text())

    return run
