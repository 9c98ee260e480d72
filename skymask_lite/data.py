"""Datasets, non-IID client splits, the server's root dataset and the malicious clients.

Every dataset is returned as a pair of :class:`torch.utils.data.TensorDataset` ``(x, y)`` with
``x`` float ``[N, C, H, W]`` normalised per channel and ``y`` long ``[N]``. The splits follow
FLTrust (Cao et al., NDSS 2021), used unchanged by FLDetector and SkyMask:

* **bias q** (:func:`bias_split`): the ``n`` clients form ``L`` groups; an example of label
  ``y`` joins group ``y`` with probability ``q`` and each other group with probability
  ``(1 - q) / (L - 1)``, then a client of that group uniformly. ``q = 1/L`` is IID.
* **Dirichlet(alpha)** (:func:`dirichlet_split`): per class, client shares ``~ Dir(alpha 1_n)``.
* **root set** (:func:`root_split`): ``root_size`` clean examples for the server, removed from
  the clients' pool; *root bias p* puts ``int(root_size * p)`` of them in one class.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATASETS = ("fmnist", "cifar10", "cifar100")
TRAIN_SIZES = {"fmnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}
"""The number of training images of each dataset (checked against a run's settings before loading)."""
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
REPO_DATA = Path(__file__).resolve().parent.parent / "data"

__all__ = [
    "DATASETS", "TRAIN_SIZES", "bias_split", "choose_malicious", "data_dirs", "dirichlet_split",
    "install_debian_fmnist", "label_shares", "load_dataset", "locate_dataset", "root_split",
]


def data_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Where datasets are looked for, in order: ``root``, ``$SKYMASK_DATA``, the repository's
    ``data/`` (in a source checkout), ``./data``.

    An explicit ``$SKYMASK_DATA`` that is not a folder is an error (``FileNotFoundError``), never
    skipped: a run must not silently read its data from somewhere else than the user said.
    """
    dirs = [Path(root)] if root is not None else []
    if os.environ.get("SKYMASK_DATA"):
        chosen = Path(os.environ["SKYMASK_DATA"])
        if not chosen.is_dir():
            raise FileNotFoundError(
                f"SKYMASK_DATA={chosen} is not a folder: point it at the folder that holds FashionMNIST/ "
                "(or cifar-10-batches-py/, cifar-100-python/), or unset it to use the default places"
            )
        dirs.append(chosen)
    if REPO_DATA.is_dir():
        dirs.append(REPO_DATA)
    dirs.append(Path("data"))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _has_fmnist(folder: Path) -> bool:
    raw = folder / "FashionMNIST" / "raw"
    return all((raw / name).is_file() for name in FMNIST_FILES)


def install_debian_fmnist(target: Path, source: Path = DEBIAN_FMNIST) -> Path:
    """Decompress the Debian package's ``*.gz`` files into torchvision's ``target/FashionMNIST/raw``.

    The Debian files are the upstream images recompressed, so their ``.gz`` checksums differ
    from torchvision's; the decompressed idx files are identical, and torchvision reads those.
    """
    raw = target / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        with gzip.open(source / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _fmnist_root(root: str | os.PathLike | None, download: bool) -> tuple[Path, bool]:
    """Find (or make) a folder holding Fashion-MNIST; returns it and whether to download."""
    dirs = data_dirs(root)
    for folder in dirs:
        if _has_fmnist(folder):
            return folder, False
    if all((DEBIAN_FMNIST / f"{name}.gz").is_file() for name in FMNIST_FILES):
        return install_debian_fmnist(dirs[0]), False
    if download:
        return dirs[0], True
    raise FileNotFoundError(_missing_message("fmnist", dirs))


def _missing_message(name: str, dirs: list[Path], download_tried: bool = False) -> str:
    """One line: where ``name`` was looked for and the ways to obtain it (the download only
    when it was not already tried)."""
    where = ", ".join(str(d) for d in dirs)
    ways = ["point $SKYMASK_DATA at a folder holding torchvision's layout"]
    if download_tried:
        ways.insert(0, "torchvision's download failed: connect to the internet and run again")
    else:
        ways.insert(0, f"let torchvision download it (needs internet): load_dataset({name!r}, download=True)")
    if name == "fmnist":
        ways.insert(0, "on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (works offline from the mirror)")
    return f"{name} not found in {where}. Ways to obtain it: " + "; ".join(ways)


def locate_dataset(name: str, root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The folder ``name`` will be read from (no image is loaded): cheap, so a run checks its data
    before any compute. Fashion-MNIST from the Debian package is unpacked there on the way.

    Raises ``FileNotFoundError`` (one line, with the ways to obtain it) when the dataset is absent
    and ``download`` is off, and for a ``$SKYMASK_DATA`` that is not a folder.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if name == "fmnist":
        return _fmnist_root(root, download)[0]
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    dirs = data_dirs(root)
    folder = next((d for d in dirs if _cifar_present(d, cls)), None)
    if folder is None and not download:
        raise FileNotFoundError(_missing_message(name, dirs))
    return folder or dirs[0]


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel; ``images`` uint8 ``[N, C, H, W]``."""
    return (images.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def load_dataset(
    name: str, root: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[TensorDataset, TensorDataset]:
    """Load ``name`` ("fmnist", "cifar10" or "cifar100") as normalised ``(train, test)`` tensors.

    Fashion-MNIST is looked for in :func:`data_dirs` and in the Debian package's folder
    (``apt-get install dataset-fashion-mnist``) before any download. CIFAR goes through
    torchvision (``download=True`` fetches it where the internet is reachable, e.g. Colab).
    Both are normalised with the training set's per-channel mean and standard deviation.
    """
    import torchvision.datasets as tvd

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if name == "fmnist":
        folder, fetch = _fmnist_root(root, download)
        try:
            parts = [tvd.FashionMNIST(str(folder), train=t, download=fetch) for t in (True, False)]
        except (RuntimeError, OSError) as err:
            said = " ".join(str(err).split())
            raise FileNotFoundError(
                _missing_message(name, data_dirs(root), download_tried=fetch) + f" (torchvision said: {said})"
            ) from err
        arrays = [(p.data.unsqueeze(1), p.targets.long()) for p in parts]
    else:
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        folder = locate_dataset(name, root, download=download)
        try:
            parts = [cls(str(folder), train=t, download=download) for t in (True, False)]
        except (RuntimeError, OSError) as err:
            said = " ".join(str(err).split())
            raise FileNotFoundError(
                _missing_message(name, data_dirs(root), download_tried=download) + f" (torchvision said: {said})"
            ) from err
        arrays = [
            (torch.from_numpy(np.asarray(p.data)).permute(0, 3, 1, 2), torch.as_tensor(p.targets, dtype=torch.long))
            for p in parts
        ]
    mean, std = _channel_stats(arrays[0][0])
    train, test = (TensorDataset(_normalise(x, mean, std), y) for x, y in arrays)
    return train, test


def _cifar_present(folder: Path, cls: type) -> bool:
    return (folder / cls.base_folder).is_dir()


def bias_split(
    labels: torch.Tensor, num_clients: int, bias: float, *, num_classes: int, seed: int = 0
) -> list[torch.Tensor]:
    """FLTrust's non-IID "bias q" split: a list of ``num_clients`` sorted index tensors.

    Clients are cut into ``L = num_classes`` contiguous groups of (about) ``n / L`` clients.
    An example of label ``y`` goes to group ``y`` with probability ``q = bias``, otherwise to
    one of the other ``L - 1`` groups uniformly; inside its group, to a client uniformly.
    A client of group ``g`` then holds about a share ``q`` of label ``g`` (balanced classes).
    """
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias q must be in [0, 1], got {bias}")
    if num_clients < num_classes:
        raise ValueError(
            f"the bias split needs at least one client per class group: num_clients={num_clients} "
            f"< num_classes={num_classes}; use more clients or split='dirichlet'"
        )
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    own = rng.random(len(y)) < bias
    other = rng.integers(0, num_classes - 1, len(y))
    group = np.where(own, y, other + (other >= y))  # skip label y among the L-1 others
    group_of_client = np.arange(num_clients) * num_classes // num_clients
    start = np.searchsorted(group_of_client, np.arange(num_classes))
    size = np.bincount(group_of_client, minlength=num_classes)
    client = start[group] + (rng.random(len(y)) * size[group]).astype(np.int64)
    return _indices_by_client(client, num_clients)


def dirichlet_split(
    labels: torch.Tensor, num_clients: int, alpha: float, *, num_classes: int, seed: int = 0
) -> list[torch.Tensor]:
    """Dirichlet non-IID split (Hsu et al. 2019): for each class ``c``, client shares
    ``p_c ~ Dir(alpha * 1_n)``; the examples of class ``c`` are dealt out in those shares.
    Small ``alpha`` is very skewed; ``alpha -> inf`` tends to IID."""
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    client = np.empty(len(y), dtype=np.int64)
    for c in range(num_classes):  # L iterations; each one vectorised over its examples
        idx = np.flatnonzero(y == c)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        client[rng.permutation(idx)] = np.repeat(np.arange(num_clients), np.diff(np.r_[0, cuts, len(idx)]))
    return _indices_by_client(client, num_clients)


def _indices_by_client(client: np.ndarray, num_clients: int) -> list[torch.Tensor]:
    order = np.argsort(client, kind="stable")
    bounds = np.searchsorted(client[order], np.arange(num_clients + 1))
    return [torch.from_numpy(order[bounds[i] : bounds[i + 1]].copy()) for i in range(num_clients)]


def root_split(
    labels: torch.Tensor,
    root_size: int = 100,
    *,
    num_classes: int,
    root_bias: float | None = None,
    root_class: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the server's clean root dataset; returns ``(root_indices, remaining_indices)``.

    FLTrust's *root bias p*: ``int(root_size * p)`` examples of ``root_class``, the rest spread
    evenly over the other classes. ``p = None`` or ``p = 1/L`` is a uniform root set.
    """
    p = 1.0 / num_classes if root_bias is None else root_bias
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"root_bias p must be in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    major = int(round(root_size * p, 9))
    others = [c for c in range(num_classes) if c != root_class]
    counts = dict.fromkeys(range(num_classes), 0)
    counts[root_class] = major
    for k, c in enumerate(others):
        counts[c] = (root_size - major) // len(others) + (k < (root_size - major) % len(others))
    picked = []
    for c, count in counts.items():
        pool = np.flatnonzero(y == c)
        if count > len(pool):
            raise ValueError(f"root set wants {count} examples of class {c} but only {len(pool)} exist")
        picked.append(rng.choice(pool, size=count, replace=False))
    root = np.sort(np.concatenate(picked))
    rest = np.setdiff1d(np.arange(len(y)), root)
    return torch.from_numpy(root), torch.from_numpy(rest)


def choose_malicious(num_clients: int, num_malicious: int, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of ``num_malicious`` client indices (sorted long tensor)."""
    if not 0 <= num_malicious <= num_clients:
        raise ValueError(f"num_malicious must be in [0, num_clients={num_clients}], got {num_malicious}")
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(num_clients, size=num_malicious, replace=False)))


def label_shares(labels: torch.Tensor, splits: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """``[n, L]`` matrix: share of each label in each client's data (rows sum to 1)."""
    counts = torch.stack([torch.bincount(labels[idx], minlength=num_classes) for idx in splits]).float()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
