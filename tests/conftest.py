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
