"""`peerd bench exchange --against-hivemind`: peerd's exchange step next to hivemind's
DecentralizedAverager on the same tensors, in one run.

hivemind 1.1.12 (the library decentralized training uses today) is never a dependency of
peerd: it goes into its own virtual environment, created on first use from PyPI with torch
pinned to the version peerd runs (so the CPU build already on the machine serves both). Its
wheel carries the libp2p daemon (p2pd) it needs. peerd/bench/hivemind_averager.py runs there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import torch

from peerd.algorithm.submodel import init_params
from peerd.bench.exchange import MIB, ExchangeResult, model_config, run_exchange
from peerd.bench.processes import BenchError
from peerd.models.transformer import TransformerSpec

HIVEMIND = "hivemind==1.1.12"
DEFAULT_VENV = Path.home() / ".cache" / "peerd" / "hivemind-1.1.12"
AVERAGER_SCRIPT = Path(__file__).with_name("hivemind_averager.py")
INSTALL_TIMEOUT_S = 1800.0


def hivemind_python(venv_dir: Path) -> Path:
    """The hivemind environment's interpreter, made (and hivemind installed) if missing."""
    python = venv_dir / "bin" / "python"
    if python.exists() and subprocess.run(
            [python, "-c", "import hivemind"], capture_output=True).returncode == 0:
        return python
    print(f"installing {HIVEMIND} into {venv_dir} (once)", file=sys.stderr)
    venv.create(venv_dir, with_pip=True, clear=True)
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", HIVEMIND, torch_pin],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if installed.returncode != 0:
        raise BenchError(f"pip could not install {HIVEMIND} into {venv_dir}:\n"
                         f"{installed.stderr[-2000:]}")
    return python


def model_shapes(mib: int) -> list[list[int]]:
    """The shapes of the exchange benchmark's model of about `mib` MiB."""
    return [list(t.shape) for t in init_params(TransformerSpec(model_config(mib)), 0).values()]


@dataclass(frozen=True)
class HivemindResult:
    peers: int
    step_seconds: tuple[float, ...]

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_seconds)


def run_hivemind(python: Path, peers: int, mib: int, repeats: int,
                 timeout_s: float) -> HivemindResult:
    request = {"peers": peers, "shapes": model_shapes(mib), "repeats": repeats,
               "timeout_s": timeout_s}
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([python, AVERAGER_SCRIPT], input=json.dumps(request),
                          capture_output=True, text=True, env=environment,
                          timeout=timeout_s * (repeats + 2) + 120)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"hivemind's averager failed ({peers} peers, {mib} MiB):\n"
                         f"{done.stderr[-3000:]}")
    reply = json.loads(lines[-1])
    return HivemindResult(peers, tuple(reply["step_seconds"]))


@dataclass(frozen=True)
class AnchorRow:
    mib: int
    peerd: ExchangeResult
    hivemind: HivemindResult

    @property
    def ratio(self) -> float:
        """peerd's step over hivemind's (below 1: peerd is faster)."""
        return self.peerd.median_round_s / self.hivemind.median_step_s


@dataclass(frozen=True)
class AnchorResult:
    rows: tuple[AnchorRow, ...]

    def to_json(self) -> list[dict]:
        return [{"peers": row.peerd.peers, "mib": row.mib,
                 "model_bytes": row.peerd.payload_bytes,
                 "peerd_step_s": round(row.peerd.median_round_s, 4),
                 "peerd_tcp_floor_s": round(row.peerd.tcp_floor_s, 4),
                 "hivemind_step_s": round(row.hivemind.median_step_s, 4),
                 "peerd_over_hivemind": round(row.ratio, 4),
                 "reduce_scatter": row.peerd.reduce_scatter,
                 "bulk": row.peerd.bulk,
                 "socket_bytes_over_floor": round(row.peerd.max_socket_ratio, 4),
                 "peerd_runs": [round(s, 4) for s in row.peerd.step_seconds],
                 "hivemind_runs": [round(s, 4) for s in row.hivemind.step_seconds]}
                for row in self.rows]

    def describe(self) -> str:
        lines = [f"{'peers':>5} {'MiB':>6} {'peerd':>20} {'peerd s':>8} {'hivemind s':>10} "
                 f"{'peerd/hivemind':>14} {'raw TCP all-to-all s':>20} "
                 f"{'socket in / 2(N-1)/N model':>26}"]
        for row in self.rows:
            exchange = "reduce-scatter" if row.peerd.reduce_scatter else "direct"
            exchange += ", bulk" if row.peerd.bulk else ", gRPC"
            lines.append(f"{row.peerd.peers:>5} {row.peerd.payload_bytes / MIB:>6.1f} "
                         f"{exchange:>20} {row.peerd.median_round_s:>8.3f} "
                         f"{row.hivemind.median_step_s:>10.3f} {row.ratio:>14.3f} "
                         f"{row.peerd.tcp_floor_s:>20.3f} {row.peerd.max_socket_ratio:>26.3f}")
        return "\n".join(lines)


def run_anchor(peer_counts: list[int], mibs: list[int], repeats: int,
               venv_dir: Path = DEFAULT_VENV, reduce_scatter: bool = False,
               bulk: bool = True) -> AnchorResult:
    """For every (peers, MiB): peerd's exchange step, then hivemind's all-reduce step."""
    python = hivemind_python(venv_dir)
    rows = []
    for peers in peer_counts:
        for mib in mibs:
            peerd = run_exchange(peers, mib, repeats, reduce_scatter, bulk)
            # The same bound on a step as peerd's bench uses: none slower than 2 MiB/s.
            timeout_s = 60.0 + peerd.payload_bytes * peers / MIB / 2.0
            rows.append(AnchorRow(mib, peerd, run_hivemind(python, peers, mib, repeats,
                                                            timeout_s)))
            # Each row as it is done (a long grid may be cut short).
            print(AnchorResult((rows[-1],)).describe(), file=sys.stderr, flush=True)
    return AnchorResult(tuple(rows))
