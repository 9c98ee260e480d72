import pytest
import torch

from skymask_lite import data
from skymask_lite.data import bias_split, choose_malicious, dirichlet_split, label_shares, load_dataset, root_split


def test_fmnist_is_real_and_normalised(fmnist):
    train, test = fmnist
    x, y = train.tensors
    assert x.shape == (60000, 1, 28, 28) and test.tensors[0].shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.bincount(y).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4


def test_missing_dataset_error_names_the_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FMNIST", tmp_path / "nowhere")
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "nothing")
    monkeypatch.delenv("SKYMASK_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist", tmp_path, download=False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


@pytest.mark.parametrize("name,num_classes,train_files", [("cifar10", 10, 5), ("cifar100", 100, 1)])
def test_cifar_loads_through_torchvision(tmp_path, fake_cifar, name, num_classes, train_files):
    fake_cifar(tmp_path, name, num_classes)
    train, test = load_dataset(name, tmp_path, download=False)
    assert train.tensors[0].shape == (6 * train_files, 3, 32, 32)
    assert test.tensors[0].shape == (6, 3, 32, 32)
    assert train.tensors[1].tolist()[:6] == list(range(6))
    x = train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "nothing")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar10 not found"):
        load_dataset("cifar10", tmp_path, download=False)


def test_bias_split_gives_each_client_about_q_of_its_group_label(fmnist):
    y = fmnist[0].tensors[1]
    for q in (0.5, 0.8):
        splits = bias_split(y, 100, q, num_classes=10, seed=1)
        assert sorted(torch.cat(splits).tolist()) == list(range(len(y)))  # a partition
        group = torch.arange(100) * 10 // 100
        own = label_shares(y, splits, 10)[torch.arange(100), group]
        assert abs(own.mean().item() - q) < 0.05


def test_bias_split_iid_when_q_is_one_over_l(fmnist):
    y = fmnist[0].tensors[1]
    shares = label_shares(y, bias_split(y, 20, 0.1, num_classes=10, seed=0), 10)
    assert (shares - 0.1).abs().max() < 0.03


def test_splits_are_deterministic_and_seed_dependent(fmnist):
    y = fmnist[0].tensors[1]
    a, b, c = (bias_split(y, 30, 0.5, num_classes=10, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    d1 = dirichlet_split(y, 30, 0.3, num_classes=10, seed=3)
    d2 = dirichlet_split(y, 30, 0.3, num_classes=10, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(d1, d2))


def test_dirichlet_split_partitions_and_skews(fmnist):
    y = fmnist[0].tensors[1]
    skewed = label_shares(y, dirichlet_split(y, 20, 0.1, num_classes=10, seed=0), 10)
    flat = label_shares(y, dirichlet_split(y, 20, 1000.0, num_classes=10, seed=0), 10)
    assert sum(len(s) for s in dirichlet_split(y, 20, 0.1, num_classes=10)) == len(y)
    assert skewed.max(dim=1).values.mean() > 0.5 > flat.max(dim=1).values.mean()


def test_bias_split_errors():
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one client per class"):
        bias_split(y, 5, 0.5, num_classes=10)
    with pytest.raises(ValueError, match="bias q must be in"):
        bias_split(y, 10, 1.5, num_classes=10)


def test_root_split_uniform_and_biased(fmnist):
    y = fmnist[0].tensors[1]
    root, rest = root_split(y, 100, num_classes=10, seed=0)
    assert torch.bincount(y[root], minlength=10).tolist() == [10] * 10
    assert len(set(root.tolist()) & set(rest.tolist())) == 0 and len(root) + len(rest) == len(y)
    root, _ = root_split(y, 100, num_classes=10, root_bias=0.6, root_class=3, seed=0)
    counts = torch.bincount(y[root], minlength=10).tolist()
    assert counts[3] == 60 and sum(counts) == 100 and set(counts[:3] + counts[4:]) <= {4, 5}


def test_choose_malicious():
    m = choose_malicious(100, 20, seed=5)
    assert len(set(m.tolist())) == 20 and torch.equal(m, choose_malicious(100, 20, seed=5))
    assert torch.equal(m, m.sort().values)
    with pytest.raises(ValueError, match="num_malicious"):
        choose_malicious(10, 11)
