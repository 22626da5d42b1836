"""Keeping in touch with the peers discovery finds: a handshake with every candidate, all at
once, every HANDSHAKE_INTERVAL_S for as long as the daemon runs. What each peer answers goes to
the membership (`DaemonHost.admit`); a peer that does not answer is remembered for the
operator's waiting line, and silence is noticed by ticking the membership after every sweep.
Also the discovery sources a daemon's options ask for (static addresses, mDNS)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from peerd.algorithm.plan import Member, encode_widths
from peerd.config import DaemonConfig
from peerd.net import PROTOCOL_VERSION
from peerd.net.channels import PeerChannels
from peerd.net.discovery import (
    Candidate,
    Discovery,
    DiscoveryManager,
    MdnsDiscovery,
    PeerRecord,
    StaticDiscovery,
)
from peerd.net.frames import CALL_ERRORS
from peerd.net.host import DaemonHost
from peerd.net.membership import Membership

log = logging.getLogger("peerd.handshakes")

HANDSHAKE_INTERVAL_S = 0.5


def discovery_sources(config: DaemonConfig, me: Member, fingerprint: str, address: str,
                      port: int) -> list[Discovery]:
    """The static `--peer` addresses, and with mDNS on, this daemon's record announced and
    the others' browsed."""
    sources: list[Discovery] = [StaticDiscovery(list(config.peers))]
    if config.mdns:
        record = PeerRecord(
            peer_id=me.peer_id, cluster=config.cluster,
            protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint,
            mu=me.mu, host=address.rsplit(":", 1)[0], port=port, depth=me.depth,
            widths=tuple(encode_widths(me.widths or ())),
        )
        sources.append(MdnsDiscovery(record, config.mdns_interface))
    return sources


class Handshakes:
    """`current_round`: the round the daemon is in, which ticking the membership needs."""

    def __init__(self, clients: PeerChannels, host: DaemonHost, membership: Membership,
                 current_round: Callable[[], int]) -> None:
        self.clients = clients
        self.host = host
        self.membership = membership
        self.current_round = current_round
        self.unanswered: set[str] = set()  # addresses whose last handshake failed

    async def forever(self, discovery: DiscoveryManager) -> None:
        while True:
            # All at once: a slow or dead peer must not delay hearing from the others (silence
            # drops members from the view).
            await asyncio.gather(*(self._handshake(candidate)
                                   for candidate in discovery.candidates()
                                   if candidate.address != self.membership.address))
            # Silence is noticed here: a dead peer sends no handshakes that would tick.
            self.membership.tick(self.current_round())
            await asyncio.sleep(HANDSHAKE_INTERVAL_S)

    async def _handshake(self, candidate: Candidate) -> None:
        # An mDNS record's peer id is only a hint: the TLS handshake proves it.
        expected = candidate.record.peer_id if candidate.record else None
        try:
            self.host.admit(await self.clients.handshake(
                candidate.address, self.host.hello(), expected))
        except CALL_ERRORS as error:
            self.unanswered.add(candidate.address)
            log.debug("handshake with %s failed: %s", candidate.address, error)
        else:
            self.unanswered.discard(candidate.address)

    def waiting_line(self, min_peers: int) -> str:
        """Who has been found so far and who does not answer, for the operator."""
        found = self.membership.candidate_ids()
        line = (f"waiting for peers: {len(found)} of {min_peers} members found "
                f"({', '.join(found)})")
        if self.unanswered:
            line += f"; no answer yet from {', '.join(sorted(self.unanswered))}"
        return line
