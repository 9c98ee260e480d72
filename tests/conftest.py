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
