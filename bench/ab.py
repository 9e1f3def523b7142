"""A/B timing of dhp builds against each other: alternating source trees, one process per tree and round.

    TREES="main=/path/to/tree variant=/path/to/other" SHAPES="bfloat16/128/2/8192/16/16/1 ..." \
        [DIR=fwd|bwd] [ROUNDS=8] [REPS=20] [PEERS=cudnn] python bench/ab.py

Each tree is a source tree whose python/ holds a built dhp (its _C extension). A shape is
dtype/head_dim/batch/seqlen/heads_q/heads_kv/causal(0|1). Every round runs each tree's dhp in a process of its own
over all shapes (the trees' order reversed every other round), then the peers (PEERS, dhp.bench backend names) in a
process of their own: no dhp measurement follows another backend's run in the same process, so every tree times
its kernels under the same conditions. (Timing a peer inside the first tree's process, right after each of its
shapes, biased the first tree by up to 5-8% on some rows: bench/results/2026-11-27-h100-fwd-skip-unseen-block-ab.txt.)
Listing the same tree twice gives an A/A pair, the noise floor of the call. Prints the device and one row per shape:
TFLOP/s, the median of the rounds' medians, and the ratio to the first tree. With JSON=path it also writes every
round's milliseconds, the device, driver and versions, and each tree's build_info (its tile table) to that file,
rewritten after every round. Stopped by SIGTERM (`timeout`) or Ctrl-C, it reports the whole rounds it has.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys


def schedule(trees: list[tuple[str, str]], rounds: int, peers: bool) -> list[tuple[str, str, bool]]:
    """The processes of a call, in order: (name, tree path, whether it times the peers instead of dhp)."""
    runs = []
    for r in range(rounds):
        runs += [(name, path, False) for name, path in (trees if r % 2 == 0 else trees[::-1])]
        if peers:
            runs.append(("peers", trees[0][1], True))
    return runs


def worker() -> None:
    """Times dhp (or, with AB_PEERS, those backends) on SHAPES; prints one JSON line {case|backend: [ms, flops]}."""
    import torch
    from dhp import bench

    names = os.environ["AB_PEERS"].split(",") if os.environ.get("AB_PEERS") else ["dhp"]
    out = {}
    for spec in os.environ["SHAPES"].split():
        dtype, head_dim, batch, seqlen, heads_q, heads_kv, causal = spec.split("/")
        case = bench.Case(dtype, int(head_dim), int(batch), int(seqlen), int(heads_q), int(heads_kv), causal == "1",
                          os.environ.get("DIR", "fwd"))
        torch.manual_seed(0)
        q, k, v = bench.make_inputs(torch, case)
        dout = torch.randn_like(q)
        for name in names:
            fn = bench.timed_call(torch, name, case, q, k, v, dout)
            out[f"{case.name}|{name}"] = [bench.time_ms(torch, fn, reps=int(os.environ.get("REPS", 20)), warmup=3),
                                          case.flops]
    print("ENV " + json.dumps(bench.environment(torch)), flush=True)
    print("JSON " + json.dumps(out), flush=True)


def summarize(results: dict, trees: list[tuple[str, str]], peers: list[str]) -> list[dict]:
    """One row per case from {(case|backend, process name): [(ms, flops) per round]}: TFLOP/s of the median of the
    rounds (dhp of each tree, then each peer) and each tree's ratio to the first tree's time."""
    cases = list(dict.fromkeys(key.split("|")[0] for key, _ in results))
    rows = []
    for case in cases:
        flops = results[(case + "|dhp", trees[0][0])][0][1]
        ms = {name: statistics.median(t for t, _ in results[(case + "|dhp", name)]) for name, _ in trees}
        ms.update({peer: statistics.median(t for t, _ in results[(f"{case}|{peer}", "peers")]) for peer in peers})
        rows.append({"case": case, "flops": flops,
                     "tflops": {name: flops / t / 1e9 for name, t in ms.items()},
                     "ratio": {name: ms[trees[0][0]] / ms[name] for name, _ in trees}})
    return rows


def format_row(row: dict, trees: list[tuple[str, str]], peers: list[str]) -> str:
    text = f"{row['case']:40}"
    for name, _ in trees:
        text += f"  {name} {row['tflops'][name]:6.1f} ({row['ratio'][name]:5.3f})"
    for peer in peers:
        text += f"  {peer} {row['tflops'][peer]:6.1f}"
    return text


class Stopped(Exception):
    """SIGTERM: report the whole rounds so far."""


def _stop(signum, frame):
    raise Stopped


def report(results: dict, environments: dict, trees: list[tuple[str, str]], peers: str, rounds: int,
           table: bool) -> None:
    """The rows of the rounds in results (and with table, the device line and the rows on stdout); JSON= file."""
    peer_names = [p for p in peers.split(",") if p]
    machine = environments[trees[0][0]]
    rows = summarize(results, trees, peer_names)
    if table:
        print(f"{machine['device']}, driver {machine['driver']}, torch {machine['torch']}, cuDNN {machine['cudnn']}, "
              f"{machine['date']}")
        for row in rows:
            print(format_row(row, trees, peer_names), flush=True)
    if os.environ.get("JSON"):
        document = {"method": "bench/ab.py", "trees": dict(trees), "peers": peer_names,
                    "rounds": rounds, "reps": int(os.environ.get("REPS", 20)),
                    "environment": {k: v for k, v in machine.items() if k != "dhp_build"},
                    "builds": {name: environments[name].get("dhp_build") for name, _ in trees},
                    "rows": rows,
                    "rounds_ms": {f"{key}|{name}": [ms for ms, _ in values] for (key, name), values in results.items()}}
        with open(os.environ["JSON"], "w") as f:
            json.dump(document, f, indent=1)


def main() -> None:
    trees = [tuple(t.split("=", 1)) for t in os.environ["TREES"].split()]
    peers = os.environ.get("PEERS", "")
    rounds = int(os.environ.get("ROUNDS", 8))
    runs = schedule(trees, rounds, bool(peers))
    per_round = len(runs) // rounds
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    environments: dict[str, dict] = {}
    whole: dict = {}  # results as of the last whole round
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for i, (name, path, times_peers) in enumerate(runs):
            env = dict(os.environ, AB_WORKER="1", AB_PEERS=peers if times_peers else "",
                       PYTHONPATH=os.pathsep.join(p for p in [os.path.join(path, "python"), os.environ.get("PYTHONPATH")]
                                                  if p))
            done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
            lines = dict(l.split(" ", 1) for l in done.stdout.splitlines() if l.startswith(("JSON ", "ENV ")))
            if "JSON" not in lines:
                sys.exit(f"{name}: no result\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            environments.setdefault(name, json.loads(lines["ENV"]))
            for key, (ms, flops) in json.loads(lines["JSON"]).items():
                results.setdefault((key, name), []).append((ms, flops))
            if (i + 1) % per_round == 0:
                whole = {key: list(values) for key, values in results.items()}
                print(f"round {(i + 1) // per_round} of {rounds} done", file=sys.stderr, flush=True)
                report(whole, environments, trees, peers, (i + 1) // per_round, table=False)
    except (Stopped, KeyboardInterrupt):
        print(f"stopped: the rows below are of the {len(next(iter(whole.values()), []))} whole rounds done",
              file=sys.stderr, flush=True)
        if not whole:
            sys.exit(1)
        report(whole, environments, trees, peers, len(next(iter(whole.values()))), table=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(results, environments, trees, peers, rounds, table=True)


if __name__ == "__main__":
    if os.environ.get("AB_WORKER"):
        worker()
    else:
        main()
