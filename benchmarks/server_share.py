"""SkyMask's share of a round, over many rounds: the median, not the fastest of two.

    python benchmarks/server_share.py --device cuda            # 100 clients, 15 rounds each
    python benchmarks/server_share.py --quick                  # 20 clients, checks the script

``benchmarks/run.py`` reports the share from the fastest of ``--rounds`` rounds, so one slow
client phase moves it by a point or more. Here SkyMask rounds and FedAvg rounds (the same
federation: 100 clients, 20 Min-Max attackers, the fast engine) alternate after one warm-up
round each, so both see the same machine, and every round's phases are kept. The summary:

* ``share_median``: the median over SkyMask's rounds of ``defense / total``;
* ``server_seconds_median`` and ``skymask_round_median``, ``fedavg_round_median``;
* ``share_of_fedavg_round``: the server step over a round without it,
  ``server / (fedavg round + server)``, which does not depend on SkyMask's own client phase.

Writes ``server_share_<device>.json`` (``server_share_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from run import federation  # benchmarks/run.py: the same federation as its share
from skymask_lite.experiments import Config, build, environment
from skymask_lite.fl import initial_state, resolve_engine, run_round

OUT = Path(__file__).resolve().parent / "results"


def summarize(skymask_rounds: list[dict], fedavg_rounds: list[dict]) -> dict:
    """The medians of the per-round records (``{"defense": s, "total": s, ...}``)."""
    server = statistics.median(r["defense"] for r in skymask_rounds)
    fedavg = statistics.median(r["total"] for r in fedavg_rounds)
    return {
        "share_median": round(statistics.median(r["defense"] / r["total"] for r in skymask_rounds), 4),
        "server_seconds_median": round(server, 4),
        "skymask_round_median": round(statistics.median(r["total"] for r in skymask_rounds), 4),
        "fedavg_round_median": round(fedavg, 4),
        "share_of_fedavg_round": round(server / (fedavg + server), 4),  # server / (round without it + server)
    }


def measure(device: str, quick: bool, rounds: int) -> dict:
    base = Config(**{**federation(device, quick).__dict__, "engine": resolve_engine("auto", device)})
    runs = {}
    for rule in ("skymask", "fedavg"):
        fed, attack, defense = build(Config(**{**base.__dict__, "defense": rule}))
        runs[rule] = (fed, initial_state(fed), attack, defense)
        run_round(*runs[rule])  # warm-up: kernels, cuDNN's algorithm choice, the mask step's graph
    records: dict[str, list[dict]] = {"skymask": [], "fedavg": []}
    for _ in range(rounds):  # alternating, so that both rules see the same machine
        for rule, args in runs.items():
            record = run_round(*args)
            records[rule].append({**{k: round(v, 4) for k, v in record["timing"].items()},
                                  "total": round(record["seconds"], 4), "fpr": record["fpr"],
                                  "fnr": record["fnr"], "test_acc": record["test_acc"]})
    return {"setup": f"{base.num_clients} clients, {base.num_malicious} Min-Max attackers, engine {base.engine}",
            "rounds": rounds, **summarize(records["skymask"], records["fedavg"]), "per_round": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="20 clients (checks the script)")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds of each rule, after one warm-up")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    result = {**measure(args.device, args.quick, args.rounds),
              "env": {**environment(args.device), "machine": platform.machine(), "quick": args.quick}}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "server_share_quick" if args.quick else f"server_share_{args.device.split(':')[0]}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_round", "env")}, indent=1))


if __name__ == "__main__":
    main()
