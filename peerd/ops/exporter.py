"""A Prometheus endpoint for one daemon: its rounds, traffic, membership and refusals.

Every metric lives in the exporter's own CollectorRegistry, never prometheus_client's global
one, so several daemons (or tests) in one process do not collide and the process's default
collectors (GC, platform) stay out of a peer's page. The HTTP server that serves `render()` at
/metrics is the daemon's page server (peerd/web/), on the daemon's event loop.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# Rounds take from a fraction of a second (digits on loopback) to minutes (text on a LAN).
ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                         float("inf"))
# Integer rounds; the 0 bucket alone is what synchronous merging produces.
STALENESS_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, float("inf"))


class Exporter:
    """One daemon's metrics; every method may be called from any thread."""

    def __init__(self, peer_id: str, cluster: str, fingerprint: str, mu: float,
                 depth: int | None = None, frozen_blocks: int = 0) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.rounds = Counter("peerd_rounds", "Training rounds completed by this peer",
                              registry=registry)
        self.train_loss = Gauge("peerd_train_loss", "Mean training loss of the last round",
                                registry=registry)
        self.local_accuracy = Gauge(
            "peerd_local_accuracy",
            "Accuracy (next-token accuracy for text) of the sub-model on the local test split "
            "after the last round", registry=registry)
        self.local_loss = Gauge(
            "peerd_local_loss",
            "Loss of the sub-model on the local test split after the last round", registry=registry)
        self.train_flops = Counter("peerd_train_flops", "Training FLOPs spent by this peer",
                                   registry=registry)
        self.bytes_sent = Counter("peerd_bytes_sent", "Slice bytes pushed to and acknowledged "
                                  "by neighbours", registry=registry)
        self.bytes_received = Counter("peerd_bytes_received",
                                      "Slice bytes accepted from neighbours", registry=registry)
        self.members = Gauge("peerd_members", "Members of the committed view", registry=registry)
        self.known_peers = Gauge("peerd_known_peers",
                                 "Peers this daemon knows of (members and candidates)",
                                 registry=registry)
        self.round_duration = Histogram("peerd_round_duration_seconds",
                                        "Wall-clock duration of a training round",
                                        buckets=ROUND_SECONDS_BUCKETS, registry=registry)
        self.staleness = Histogram(
            "peerd_merged_slice_staleness_rounds",
            "Rounds between a merged slice's training round and the round it was merged into "
            "(0 in synchronous mode)", buckets=STALENESS_BUCKETS, registry=registry)
        self.rejected = Counter("peerd_rejected_messages",
                                "Incoming messages refused, by RPC and gRPC status code",
                                labelnames=("rpc", "code"), registry=registry)
        self.checkpoint_failures = Counter(
            "peerd_checkpoint_failures", "Checkpoints that could not be written (I/O errors)",
            registry=registry)
        self.rss_peak = Gauge(
            "peerd_rss_peak_bytes",
            "Peak resident memory of the daemon process (VmHWM) at the end of the last round",
            registry=registry)
        # NaN until the first round: a 0 loss would read as a perfect model, not a missing one.
        for gauge in (self.train_loss, self.local_accuracy, self.local_loss, self.rss_peak):
            gauge.set(float("nan"))
        info = Info("peerd_peer", "Identity of this peer", registry=registry)
        info.info({"peer_id": peer_id, "cluster": cluster, "model_fingerprint": fingerprint,
                   "mu": f"{mu:g}"})
        Gauge("peerd_depth", "Blocks this peer keeps, the shallowest (0: every block)",
              registry=registry).set(depth or 0)
        Gauge("peerd_frozen_blocks", "Shallowest kept blocks this peer does not train",
              registry=registry).set(frozen_blocks)
        # The record carries cumulative byte totals; the counters take the increase since the
        # previous record, and the lock keeps concurrent observers from counting one twice.
        self._lock = threading.Lock()
        self._sent_seen = 0
        self._received_seen = 0

    def observe_round(self, record: dict) -> None:
        """Take one rounds.jsonl record (see Daemon._record_round)."""
        with self._lock:
            sent = record["bytes_sent_cum"] - self._sent_seen
            received = record["bytes_received_cum"] - self._received_seen
            self._sent_seen = record["bytes_sent_cum"]
            self._received_seen = record["bytes_received_cum"]
        # Counters only go up: a smaller total than before would be a different run's record.
        self.bytes_sent.inc(max(sent, 0))
        self.bytes_received.inc(max(received, 0))
        self.rounds.inc()
        self.train_flops.inc(record["train_flops"])
        self.train_loss.set(record["train_loss"])
        self.local_accuracy.set(record["local_acc"])
        self.local_loss.set(record["local_loss"])
        self.members.set(record["members"])
        self.round_duration.observe(record["round_s"])
        self.rss_peak.set(record["rss_peak_bytes"])

    def observe_rejected(self, rpc: str, code: str) -> None:
        self.rejected.labels(rpc=rpc, code=code).inc()

    def observe_checkpoint_failure(self) -> None:
        self.checkpoint_failures.inc()

    def set_membership(self, members: int, known: int) -> None:
        self.members.set(members)
        self.known_peers.set(known)

    def observe_staleness(self, rounds: int) -> None:
        self.staleness.observe(rounds)

    def render(self) -> bytes:
        """The exposition text a scrape would get."""
        return generate_latest(self.registry)
