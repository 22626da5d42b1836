"""How slices travel between peers: the interface the round driver sends through, and its
in-memory implementation (the gRPC one is peerd/net/slices.py).

The in-memory transport delivers within one process and counts the payload bytes each peer
sends and receives, which is what the wire must carry (values only: both sides derive the
entry set from the plans).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from peerd.algorithm.engine import RoundContext
    from peerd.algorithm.reduce import PartMessage


@dataclass(frozen=True)
class SliceMessage:
    sender: str
    receiver: str
    round_index: int
    weight: float  # the sender's aggregation weight (its number of training samples)
    values: dict[str, torch.Tensor]  # parameter name -> flat values of the shared entries

    def payload_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())


class SliceTransport(Protocol):
    async def push(self, ctx: RoundContext, message: SliceMessage) -> int:
        """Deliver one slice of round `ctx`; the payload bytes the receiver acknowledged (0 when
        it was not delivered: the failure is the transport's to log)."""
        ...


# A receiver's inbox: (message, payload bytes) -> queued, or an exception refusing it.
Accept = Callable[[SliceMessage, int], None]


class InMemoryTransport:
    def __init__(self) -> None:
        self._mailboxes: dict[tuple[str, int], list[SliceMessage]] = defaultdict(list)
        self.bytes_sent: Counter[str] = Counter()
        self.bytes_received: Counter[str] = Counter()
        self._receivers: dict[str, Accept] = {}
        self._part_receivers: dict[str, Callable[[PartMessage, int], None]] = {}

    def connect(self, peer_id: str, accept: Accept) -> None:
        """Slices for `peer_id` go to `accept` (a round driver's inbox) instead of a mailbox."""
        self._receivers[peer_id] = accept

    async def push(self, ctx: RoundContext, message: SliceMessage) -> int:
        self.send(message)
        return message.payload_bytes()

    def connect_parts(self, peer_id: str, accept: Callable[[PartMessage, int], None]) -> None:
        """Part messages for `peer_id` (peerd/algorithm/reduce.py) go to `accept`."""
        self._part_receivers[peer_id] = accept

    async def push_part(self, ctx: RoundContext, part: PartMessage) -> int:
        message = part.message
        copied = replace(part, message=replace(
            message, values={name: value.clone() for name, value in message.values.items()}))
        size = message.payload_bytes()
        self.bytes_sent[message.sender] += size
        self.bytes_received[message.receiver] += size
        from peerd.algorithm.reduce import PartRefused

        try:
            self._part_receivers[message.receiver](copied, size)
        except PartRefused:
            return 0  # too late for the receiver's merge: dropped, as on the wire
        return size

    def send(self, message: SliceMessage) -> None:
        # Copies, as a wire would: the receiver must never alias the sender's tensors.
        copied = SliceMessage(
            message.sender, message.receiver, message.round_index, message.weight,
            {name: value.clone() for name, value in message.values.items()},
        )
        self.bytes_sent[message.sender] += message.payload_bytes()
        self.bytes_received[message.receiver] += message.payload_bytes()
        accept = self._receivers.get(message.receiver)
        if accept is None:
            self._mailboxes[(message.receiver, message.round_index)].append(copied)
        else:
            accept(copied, copied.payload_bytes())

    def receive(self, receiver: str, round_index: int) -> list[SliceMessage]:
        return sorted(self._mailboxes.pop((receiver, round_index), []), key=lambda m: m.sender)
