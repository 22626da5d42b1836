"""hivemind 1.1.12's DecentralizedAverager on the exchange benchmark's tensors: the anchor.

Runs inside its own virtual environment (peerd/bench/anchor.py makes it; hivemind is never a
dependency of peerd), so it imports nothing from peerd. Reads one JSON object on stdin:
{"peers": N, "shapes": [[...], ...], "repeats": R, "timeout_s": T}; prints one JSON object.

Each peer is a process with its own DHT node (all bootstrapped from the first) and an averager
over float32 tensors of the given shapes, filled from seed = its index. A step is one butterfly
all-reduce of the whole group: every peer first finds its group (matchmaking, untimed, as
peerd's benchmark does not time discovery either) and waits for the trigger; the conductor
then triggers all peers at once and times until the last one has its averaged tensors.
The first, untimed step checks that every peer ends with the mean of all initial tensors.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

PREFIX = "peerd-anchor"
STAGE_POLL_S = 0.01
LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"


def initial_tensors(shapes: list[list[int]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def peer(conn: Connection, index: int, peers: int, shapes: list[list[int]],
         initial_peers: list[str], timeout_s: float) -> None:
    torch.set_num_threads(1)
    dht = DHT(initial_peers=initial_peers, host_maddrs=[LOOPBACK_MADDR], start=True)
    if not initial_peers:
        conn.send([str(address) for address in dht.get_visible_maddrs()])
    averager = DecentralizedAverager(
        initial_tensors(shapes, index), dht, start=True, prefix=PREFIX,
        target_group_size=peers, min_group_size=peers, min_matchmaking_time=2.0,
        request_timeout=1.0, allreduce_timeout=timeout_s)
    conn.send("started")
    try:
        while (command := conn.recv()) != "stop":
            if command == "match":
                control = averager.step(wait=False, require_trigger=True, timeout=timeout_s)
                while control.stage != AveragingStage.AWAITING_TRIGGER:
                    if control.done():
                        raise RuntimeError(f"peer {index}: matchmaking failed: "
                                           f"{control.exception()!r}")
                    time.sleep(STAGE_POLL_S)
                conn.send("matched")
                conn.recv()  # "go"
                control.allow_allreduce()
                if control.result(timeout=timeout_s) is None:
                    raise RuntimeError(f"peer {index}: the all-reduce failed")
                conn.send("done")
            elif command == "check_mean":
                conn.send(_mean_error(averager, shapes, peers))
    finally:
        averager.shutdown()
        dht.shutdown()


def _mean_error(averager: DecentralizedAverager, shapes: list[list[int]], peers: int) -> float:
    """The largest distance of an averaged value from the mean of all initial tensors."""
    initial = [initial_tensors(shapes, seed) for seed in range(peers)]
    worst = 0.0
    with averager.get_tensors() as tensors:
        for position, tensor in enumerate(tensors):
            expected = torch.stack([values[position] for values in initial]).mean(dim=0)
            worst = max(worst, float((tensor - expected).abs().max()))
    return worst


def run(peers: int, shapes: list[list[int]], repeats: int, timeout_s: float) -> dict:
    context = multiprocessing.get_context("fork")  # hivemind forks its own helpers
    conns: list[Connection] = []
    processes = []
    initial_peers: list[str] = []
    try:
        for index in range(peers):
            ours, theirs = context.Pipe()
            process = context.Process(target=peer, args=(theirs, index, peers, shapes,
                                                         initial_peers, timeout_s))
            process.start()
            theirs.close()  # a peer that dies then ends our recv with EOFError
            conns.append(ours)
            processes.append(process)
            if index == 0:
                initial_peers = ours.recv()
        for conn in conns:
            if conn.recv() != "started":
                raise RuntimeError("a peer did not start")

        def step() -> float:
            for conn in conns:
                conn.send("match")
            for conn in conns:
                conn.recv()
            start = time.perf_counter()
            for conn in conns:
                conn.send("go")
            for conn in conns:
                conn.recv()
            return time.perf_counter() - start

        step()
        for conn in conns:
            conn.send("check_mean")
        worst = max(conn.recv() for conn in conns)
        if worst > 1e-4:
            raise RuntimeError(f"hivemind's average is off the mean by up to {worst:.3g}")
        seconds = [step() for _ in range(repeats)]
        for conn in conns:
            conn.send("stop")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return {"peers": peers, "median_step_s": statistics.median(seconds),
            "step_seconds": seconds, "mean_error": worst}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    print(json.dumps(run(request["peers"], request["shapes"], request["repeats"],
                         request["timeout_s"])))
