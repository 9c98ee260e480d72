"""Why SkyMask feeds its root batch through :func:`skymask_lite.models.channels_last`.

For a one-channel batch ``x`` (Fashion-MNIST), ``x.contiguous(memory_format=torch.channels_last)``
returns ``x`` unchanged: its strides fit both memory orders, PyTorch reads them as NCHW, and the
CNN's first convolution and max-pooling run in NCHW order. ``channels_last(x)`` sets the strides
explicitly. This script times, on 100 root-sized images (best of ``REPEATS``):

* the first max-pooling of the CNN (``[100, 30, 26, 26]``) in both memory orders;
* one forward and backward pass of the CNN on the root batch in each form, the network part of
  one SkyMask mask step (gradient with respect to the flat parameters, as in ``train_masks``);
* evaluating the CNN on 10,000 images: NCHW in batches of 2000 (how ``fl.predict`` did it
  before) against ``fl.predict`` (channels-last batches of 250).

Prints a table and writes ``benchmarks/results/channels_last.json``.

``--fmnist-rounds R`` instead checks, on real Fashion-MNIST, that the new evaluation changes no
result: it trains R rounds of the committed ``data/results/attacks/`` FedAvg run under Min-Max
(loop engine), compares every round's test accuracy with that file, and counts the test images
where the two evaluations predict different labels (all of them, every round). It writes
``benchmarks/results/channels_last_fmnist_check.json``. Run it with one thread, as the committed
results were computed.

Run: ``python benchmarks/channels_last.py`` and
``OMP_NUM_THREADS=1 python benchmarks/channels_last.py --fmnist-rounds 20``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from skymask_lite.experiments import Config, build, environment, load_results
from skymask_lite.fl import initial_state, predict, run_round
from skymask_lite.models import channels_last, flatten_params, make_model, unflatten
from timing import best_time

REPEATS = 20
RESULTS = Path(__file__).resolve().parent / "results" / "channels_last.json"
CHECK = RESULTS.with_name("channels_last_fmnist_check.json")


def best_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall-clock time of ``repeats`` calls after one warm-up call, in milliseconds."""
    return round(1e3 * best_time(fn, repeats, warmup=True), 3)


def network_step(net: torch.nn.Module, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Forward + backward of the network at flat parameters ``w`` (the network part of a mask step)."""
    w = w.clone().requires_grad_()
    net.eval()

    def step() -> torch.Tensor:
        loss = F.cross_entropy(functional_call(net, unflatten(w, net), (x,)), y)
        return torch.autograd.grad(loss, w)[0]

    return step


@torch.no_grad()
def nchw_predict(net: torch.nn.Module, w: torch.Tensor, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Evaluation as ``fl.predict`` did it before it fed channels-last batches."""
    net.eval()
    state = unflatten(w, net)
    return torch.cat([functional_call(net, state, (xb,)).argmax(dim=1) for xb in x.split(batch_size)])


def check_fmnist_rounds(rounds: int) -> dict:
    """Train ``rounds`` rounds of the committed FedAvg / Min-Max run; per round, its accuracy
    against the committed file's and the number of test labels the two evaluations disagree on."""
    folder = Path(__file__).resolve().parents[1] / "data" / "results" / "attacks"
    (committed,) = load_results(folder, attack="min_max", defense="fedavg")
    fed, attack, defense = build(Config(**committed["config"]))
    state = initial_state(fed)
    x = fed.test[0]
    per_round = []
    for r in range(rounds):
        record = run_round(fed, state, attack, defense)
        new, old = predict(fed.net, state.params, x, state.buffers), nchw_predict(fed.net, state.params, x)
        per_round.append({"round": r + 1, "test_acc": record["test_acc"],
                          "committed_test_acc": committed["rounds"][r]["test_acc"],
                          "labels_that_differ": int((new != old).sum())})
        print(per_round[-1], flush=True)
    return {"rounds": per_round,
            "same_accuracy_every_round": all(p["test_acc"] == p["committed_test_acc"] for p in per_round),
            "labels_that_differ": sum(p["labels_that_differ"] for p in per_round)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fmnist-rounds", type=int, default=0, help="check R real rounds instead (see above)")
    args = parser.parse_args()
    if args.fmnist_rounds:
        check = {**check_fmnist_rounds(args.fmnist_rounds), "env": environment("cpu")}
        CHECK.write_text(json.dumps(check, indent=1))
        print("same test accuracy as the committed file in every round:", check["same_accuracy_every_round"])
        print("test labels on which the two evaluations disagree, all rounds:", check["labels_that_differ"])
        return
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen)
    naive, explicit = x.contiguous(memory_format=torch.channels_last), channels_last(x)
    conv = torch.randn(100, 30, 26, 26, generator=gen)
    conv_cl = conv.contiguous(memory_format=torch.channels_last)
    test_x = torch.randn(10_000, 1, 28, 28, generator=gen)
    net = make_model("cnn", "fmnist")
    w = flatten_params(net)
    result = {
        "maxpool_ms": {
            "nchw": best_ms(lambda: F.max_pool2d(conv, 2)),
            "channels_last": best_ms(lambda: F.max_pool2d(conv_cl, 2)),
        },
        "network_step_ms": {
            "contiguous(memory_format=channels_last)": best_ms(network_step(net, w, naive, y)),
            "channels_last()": best_ms(network_step(net, w, explicit, y)),
        },
        "evaluation_ms": {
            "NCHW, batches of 2000": best_ms(lambda: nchw_predict(net, w, test_x), repeats=3),
            "fl.predict (channels-last, batches of 250)": best_ms(lambda: predict(net, w, test_x), repeats=3),
        },
        "same_predictions": bool(torch.equal(nchw_predict(net, w, test_x), predict(net, w, test_x))),
        "naive_is_unchanged": naive.stride() == x.stride(),
        "env": environment("cpu"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"{'':56}{'ms':>8}")
    for group in ("maxpool_ms", "network_step_ms", "evaluation_ms"):
        for name, ms in result[group].items():
            print(f"{group.removesuffix('_ms') + ': ' + name:56}{ms:8.2f}")
    print("x.contiguous(memory_format=channels_last) left the one-channel batch's strides unchanged:",
          result["naive_is_unchanged"])
    print("both evaluations predicted the same labels:", result["same_predictions"])


if __name__ == "__main__":
    main()
