"""How slices travel between engines: the interface the simulator and the daemon both drive.

The in-memory transport delivers within one process and counts the payload bytes each peer
sends and receives, which is what the wire must carry (values only: both sides derive the
entry set from the plans).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SliceMessage:
    sender: str
    receiver: str
    round_index: int
    weight: float  # the sender's aggregation weight (its number of training samples)
    values: dict[str, torch.Tensor]  # parameter name -> flat values of the shared entries

    def payload_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())


class Transport(Protocol):
    def send(self, message: SliceMessage) -> None: ...

    def receive(self, receiver: str, round_index: int) -> list[SliceMessage]: ...


class InMemoryTransport:
    def __init__(self) -> None:
        self._mailboxes: dict[tuple[str, int], list[SliceMessage]] = defaultdict(list)
        self.bytes_sent: Counter[str] = Counter()
        self.bytes_received: Counter[str] = Counter()

    def send(self, message: SliceMessage) -> None:
        # Copies, as a wire would: the receiver must never alias the sender's tensors.
        copied = SliceMessage(
            message.sender, message.receiver, message.round_index, message.weight,
            {name: value.clone() for name, value in message.values.items()},
        )
        self._mailboxes[(message.receiver, message.round_index)].append(copied)
        self.bytes_sent[message.sender] += message.payload_bytes()
        self.bytes_received[message.receiver] += message.payload_bytes()

    def receive(self, receiver: str, round_index: int) -> list[SliceMessage]:
        return sorted(self._mailboxes.pop((receiver, round_index), []), key=lambda m: m.sender)
