"""`peerd status`: one daemon's view of the cluster, as a table or JSON."""

from __future__ import annotations

import asyncio
import json
import time

from google.protobuf.json_format import MessageToDict

from peerd.net.channels import PeerChannels
from peerd.net.tls import TlsIdentity
from peerd.v1 import peer_pb2


async def fetch_status(address: str, tls: TlsIdentity | None) -> peer_pb2.StatusReply:
    """Any certificate of the cluster may ask; the daemon's name is learnt from its own."""
    clients = PeerChannels(tls)
    try:
        return await clients.status(address)
    finally:
        await clients.close()


def _age(last_seen_unix: float) -> str:
    return f"{time.time() - last_seen_unix:.1f}s ago" if last_seen_unix else "-"


def _depth(capacity: peer_pb2.Capacity) -> str:
    """Blocks kept / frozen: 'all' for a peer that keeps every block."""
    return f"{capacity.depth or 'all'}/{capacity.frozen_blocks}"


def format_status(reply: peer_pb2.StatusReply) -> str:
    me = reply.self
    lines = [
        f"peer {me.peer_id} at {me.address}  cluster {me.cluster}  round {me.round}  "
        f"rounds done {reply.rounds_done}  loss {reply.train_loss:.4f}",
        f"view {me.view_id or '(not committed)'}: {len(me.members)} members  "
        f"sent {reply.bytes_sent} B  received {reply.bytes_received} B",
        "",
        f"{'position':>8}  {'peer':<20} {'address':<22} {'mu':>6} {'depth/frozen':>12} "
        f"{'round':>6} "
        f"{'last seen':>10} {'sent B':>12} {'received B':>12}  neighbour",
    ]
    rows = [(list(me.members).index(me.peer_id) if me.peer_id in me.members else -1, me.peer_id,
             me.address, me.capacity.mu, _depth(me.capacity), me.round, "self",
             reply.bytes_sent, reply.bytes_received, "")]
    rows += [(p.position, p.peer_id, p.address, p.capacity.mu, _depth(p.capacity), p.round,
              _age(p.last_seen_unix), p.bytes_sent, p.bytes_received,
              "yes" if p.neighbour else "")
             for p in reply.peers]
    for (position, peer_id, address, mu, depth, round_index, seen, sent, received,
         neighbour) in sorted(rows, key=lambda row: (row[0] < 0, row[0], row[1])):
        shown = str(position) if position >= 0 else "-"
        lines.append(f"{shown:>8}  {peer_id:<20} {address:<22} {mu:>6.3f} {depth:>12} "
                     f"{round_index:>6} {seen:>10} {sent:>12} {received:>12}  {neighbour}")
    learned = [(me.peer_id, me.capacity.widths)] + [(p.peer_id, p.capacity.widths)
                                                    for p in reply.peers]
    lines += [f"learned widths of {peer_id} (units per group, in table order): "
              f"{','.join(map(str, widths))}" for peer_id, widths in learned if widths]
    return "\n".join(lines)


def show_status(address: str, as_json: bool, tls: TlsIdentity | None) -> str:
    reply = asyncio.run(fetch_status(address, tls))
    if as_json:
        return json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2)
    return format_status(reply)
