"""How many peers hold each weight entry under msfusion's windows, by N and mu (no training).

Usage: python scripts/window_holders.py [fmnist|kjv|kjv-large|digits] [--round T]
           [--layout ring|rotating|scattered] [--drift-period R] [--drift-rates rank|colour]
           [--peers N] [--mu F]

Per (N, mu) (4 to 32 peers and mu 0.125 to 0.5, or only `--peers`, `--mu`): the holders of
each unit (N mu), and the fractions of all parameter entries held by exactly one peer and by
two or more in round T (default 0). A unit has N mu holders, but an
entry of a weight that joins two groups is held only by a peer whose windows of both groups
contain it; with the windows ordered by ring position in every group (so a unit's co-holders
are ring neighbours), a peer's blocks of every weight matrix lie on one diagonal band of width
about 2 mu, whatever N (docs/ALGORITHM.md, small widths). `--layout scattered` lays each
group's windows in a seeded order of the members instead (rotating holds what ring holds).

The last column says how fast the windows move against the model: the share of the entries a
peer holds in a round that it holds again in the next, averaged over the peers and the rounds
T to T + 7 (drift period R, default 64; docs/ALGORITHM.md, a slower drift), under the drift rates
`--drift-rates` (rank or colour; docs/ALGORITHM.md, drift rates from a colouring); and after it
the round by which every weight entry has been held by some peer since round 0 (DESIGN
invariant 3; "-" if not within 2 R rounds).
"""

from __future__ import annotations

import argparse

from peerd.algorithm.coverage import rounds_until_covered
from peerd.algorithm.plan import LAYOUTS, RING_LAYOUT, Member, Planner, make_planner
from peerd.algorithm.submodel import Params, entry_mask, init_params
from peerd.config import DEFAULT_DRIFT_RATES, DRIFT_PERIOD, DRIFT_RATES
from peerd.models.base import ModelSpec
from peerd.tasks import get_task

PEERS = (4, 8, 16, 32)
MUS = (0.125, 0.25, 0.5)
PERSISTENCE_ROUNDS = 8


def held_again(spec: ModelSpec, params: Params, planner: Planner, members: list[Member],
               first_round: int) -> float:
    """Mean over peers and rounds of |held now and next round| / |held now|."""
    shares = []
    for round_index in range(first_round, first_round + PERSISTENCE_ROUNDS):
        now = planner.plan(round_index, members, spec.groups)
        later = planner.plan(round_index + 1, members, spec.groups)
        for member in members:
            kept = held = 0
            for name, tensor in params.items():
                mask = entry_mask(spec, now[member.peer_id], name, tensor.shape)
                kept += int((mask & entry_mask(spec, later[member.peer_id], name,
                                                tensor.shape)).sum())
                held += int(mask.sum())
            shares.append(kept / held)
    return sum(shares) / len(shares)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", nargs="?", default="fmnist")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--layout", default=RING_LAYOUT, choices=LAYOUTS)
    parser.add_argument("--drift-period", type=int, default=DRIFT_PERIOD)
    parser.add_argument("--drift-rates", default=DEFAULT_DRIFT_RATES, choices=DRIFT_RATES)
    parser.add_argument("--peers", type=int)
    parser.add_argument("--mu", type=float)
    args = parser.parse_args()
    task = get_task(args.task)
    spec = task.model(task.load_data(None))
    params = init_params(spec, 0)
    planner = make_planner("msfusion", 0, drift_period=args.drift_period, layout=args.layout,
                           drift_rates=args.drift_rates, spec=spec)
    print("| N | mu | holders per unit | entries held | by 1 peer | by 2+ peers "
          "| held again next round | every entry held by round |")
    print("|---|---|---|---|---|---|---|---|")
    for peers in (args.peers,) if args.peers else PEERS:
        for mu in (args.mu,) if args.mu else MUS:
            members = [Member(f"peer-{i:02d}", mu) for i in range(peers)]
            plans = planner.plan(args.round, members, spec.groups)
            one = several = total = 0
            for name, tensor in params.items():
                holders = sum(entry_mask(spec, plan, name, tensor.shape).int()
                              for plan in plans.values())
                one += int((holders == 1).sum())
                several += int((holders >= 2).sum())
                total += tensor.numel()
            again = held_again(spec, params, planner, members, args.round)
            covered = rounds_until_covered(spec, planner, members, 2 * args.drift_period)
            print(f"| {peers} | {mu} | {peers * mu:g} | {(one + several) / total:.3f} | "
                  f"{one / total:.3f} | {several / total:.3f} | {again:.3f} | "
                  f"{'-' if covered is None else covered} |", flush=True)


if __name__ == "__main__":
    main()
