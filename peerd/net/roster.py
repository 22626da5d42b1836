"""The membership as the round driver sees it: the members of each round, who is leaving, and
the two waits a daemon takes before a round (the view settled; semi-async, catching up)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from peerd.algorithm.plan import Member
from peerd.algorithm.topology import Topology
from peerd.net.membership import Membership

log = logging.getLogger("peerd.roster")

SETTLE_POLL_S = 0.05


class MembershipRoster:
    def __init__(self, membership: Membership, topology: Topology, last_round: int | None,
                 stopping: asyncio.Event) -> None:
        self.membership = membership
        self.topology = topology
        self.last_round = last_round  # the run's last round index, None: until stopped
        self.stopping = stopping

    def members_at(self, round_index: int) -> Sequence[Member] | None:
        view = self.membership.view_at(round_index)
        return None if view is None else view.members

    def leaving(self) -> frozenset[str]:
        return self.membership.leaving()

    def dropped(self) -> bool:
        return self.membership.dropped()

    async def settle(self, round_index: int) -> bool:
        """Wait until the view of this round is known: every leave that may take effect now
        and every join accepted for it decided. False when stopping or dropped."""
        membership = self.membership
        previous = membership.view_at(round_index - 1)
        while True:
            membership.tick(round_index)
            if self.stopping.is_set() or membership.dropped():
                return False
            if membership.settle_leaves(round_index) and membership.settle_joins(round_index):
                break
            await asyncio.sleep(SETTLE_POLL_S)
        after = membership.view_at(round_index)
        if after is not None and previous is not None and after is not previous:
            gone = sorted(set(previous.ids) - set(after.ids))
            came = sorted(set(after.ids) - set(previous.ids))
            log.info("view %s from round %d: %s%s%s", after.view_id, round_index,
                     ", ".join(after.ids), f" (dropped: {', '.join(gone)})" if gone else "",
                     f" (joined: {', '.join(came)})" if came else "")
        return True

    def catch_up(self, round_index: int) -> int:
        """Semi-async: the round to run next. A peer whose neighbours are rounds ahead skips to
        the furthest one's round instead of training rounds whose slices would reach them too
        late (a straggler keeps training, on the rounds its neighbours are in). Never past a
        round where the view may change (a join is applied at exactly its round, and the
        joiner pulls parameters after the round before it), nor past the last round."""
        membership = self.membership
        me = membership.me.peer_id
        view = membership.view_at(round_index)
        if view is None or me not in view.ids:
            return round_index
        neighbours = self.topology.neighbours(list(view.ids), me)
        target = max((membership.known[p].round for p in neighbours if p in membership.known),
                     default=round_index)
        changes = [*membership.tickets.values(), *(t.round for t in membership.leaves.values())]
        limits = [target, *(r - 1 for r in changes if r > round_index)]
        if self.last_round is not None:
            limits.append(self.last_round)
        target = min(limits)
        if target > round_index and membership.view_at(target) is view:
            log.info("round %d: neighbours are at round %d; skipping to it", round_index, target)
            return target
        return round_index
