"""Metrics: test accuracy, backdoor attack success rate (ASR), detection FPR/FNR.

* accuracy = share of test examples whose predicted label is the true one.
* ASR (Bagdasaryan et al. 2020) = share of TEST images whose true label is not the target
  that, with the trigger stamped, are classified as the target.
* FPR = benign clients flagged / benign clients; FNR = malicious clients kept / malicious
  clients (SkyMask, Yan et al. ECCV 2024, section 5). A rule's flagged set is the complement
  of its ``kept`` set.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["accuracy", "attack_success_rate", "detection_rates"]


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``predicted == labels``."""
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
    return (predicted == labels).float().mean().item()


def attack_success_rate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    add_trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
) -> float:
    """ASR: share of triggered test images with ``y != target`` that ``predict`` labels ``target``."""
    others = y != target
    return (predict(add_trigger(x[others])) == target).float().mean().item()


def detection_rates(kept: torch.Tensor, malicious: torch.Tensor, num_clients: int) -> dict[str, float | None]:
    """``{"fpr": benign flagged / benign, "fnr": malicious kept / malicious}``; a rate whose
    denominator is 0 (no benign or no malicious client) is ``None``."""
    is_kept = torch.zeros(num_clients, dtype=torch.bool)
    is_kept[kept.cpu()] = True
    is_mal = torch.zeros(num_clients, dtype=torch.bool)
    is_mal[malicious.cpu()] = True
    benign, bad = (~is_mal).sum().item(), is_mal.sum().item()
    return {
        "fpr": ((~is_kept) & ~is_mal).sum().item() / benign if benign else None,
        "fnr": (is_kept & is_mal).sum().item() / bad if bad else None,
    }
