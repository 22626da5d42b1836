"""The Prometheus metrics: exact values after observed rounds (served over HTTP: test_web.py)."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peerd.ops.exporter import Exporter


def record(round_number: int, sent: int, received: int, round_s: float) -> dict:
    return {
        "round": round_number, "peer_id": "peer-00", "train_loss": 2.0 / round_number,
        "local_acc": 0.25 * round_number, "local_loss": 1.5 / round_number,
        "local_ppl": 4.0, "samples": 100, "forward_flops_per_sample": 1000,
        "train_flops": 300_000, "bytes_sent_cum": sent, "bytes_received_cum": received,
        "neighbours": ["peer-01", "peer-02"], "members": 3, "round_s": round_s,
        "wall_s": 1.0 * round_number, "params_full": 1000,
        "rss_peak_bytes": (100 + round_number) << 20,
    }


ROUNDS = [record(1, 1000, 900, 0.3), record(2, 2500, 1800, 0.7), record(3, 4096, 3000, 40.0)]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, via prometheus_client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def observed() -> Exporter:
    exporter = Exporter("peer-00", "lab", "abc123", 0.5)
    for r in ROUNDS:
        exporter.observe_round(r)
    exporter.observe_rejected("PushSlice", "FAILED_PRECONDITION")
    exporter.observe_rejected("PushSlice", "FAILED_PRECONDITION")
    exporter.observe_rejected("Join", "PERMISSION_DENIED")
    exporter.set_membership(3, 5)
    for staleness in (0, 0, 2):
        exporter.observe_staleness(staleness)
    return exporter


def check(values: dict[tuple[str, frozenset], float]) -> None:
    def value(name: str, **labels: str) -> float:
        return values[(name, frozenset(labels.items()))]

    last = ROUNDS[-1]
    assert value("peerd_rounds_total") == 3.0
    assert value("peerd_bytes_sent_total") == last["bytes_sent_cum"]
    assert value("peerd_bytes_received_total") == last["bytes_received_cum"]
    assert value("peerd_train_flops_total") == 3 * 300_000
    assert value("peerd_train_loss") == pytest.approx(last["train_loss"])
    assert value("peerd_rss_peak_bytes") == last["rss_peak_bytes"]
    assert value("peerd_local_accuracy") == 0.75
    assert value("peerd_local_loss") == 0.5
    assert value("peerd_members") == 3.0
    assert value("peerd_known_peers") == 5.0
    assert value("peerd_rejected_messages_total", rpc="PushSlice",
                 code="FAILED_PRECONDITION") == 2.0
    assert value("peerd_rejected_messages_total", rpc="Join", code="PERMISSION_DENIED") == 1.0
    assert value("peerd_round_duration_seconds_count") == 3.0
    assert value("peerd_round_duration_seconds_sum") == pytest.approx(41.0)
    assert value("peerd_round_duration_seconds_bucket", le="0.5") == 1.0
    assert value("peerd_round_duration_seconds_bucket", le="1.0") == 2.0
    assert value("peerd_round_duration_seconds_bucket", le="30.0") == 2.0
    assert value("peerd_round_duration_seconds_bucket", le="60.0") == 3.0
    assert value("peerd_merged_slice_staleness_rounds_bucket", le="0.0") == 2.0
    assert value("peerd_merged_slice_staleness_rounds_bucket", le="2.0") == 3.0
    assert value("peerd_merged_slice_staleness_rounds_sum") == 2.0
    assert value("peerd_peer_info", peer_id="peer-00", cluster="lab",
                 model_fingerprint="abc123", mu="0.5") == 1.0


def test_render_without_server() -> None:
    text = observed().render().decode()
    check(samples(text))
    assert "# HELP peerd_rounds_total Training rounds completed by this peer" in text
    # Its own registry: none of the process-wide default collectors.
    assert "python_gc" not in text and "process_" not in text


def test_before_the_first_round() -> None:
    values = samples(Exporter("peer-00", "lab", "f", 1.0).render().decode())
    assert values[("peerd_rounds_total", frozenset())] == 0.0
    # No loss yet is NaN, not a perfect 0.
    assert math.isnan(values[("peerd_train_loss", frozenset())])
    assert math.isnan(values[("peerd_local_accuracy", frozenset())])
    assert not any(name == "peerd_rejected_messages_total" for name, _ in values)


def test_two_exporters_do_not_share_metrics() -> None:
    first, second = Exporter("a", "lab", "f", 1.0), Exporter("b", "lab", "f", 0.25)
    first.observe_round(ROUNDS[0])
    assert samples(second.render().decode())[("peerd_rounds_total", frozenset())] == 0.0
    assert samples(first.render().decode())[("peerd_rounds_total", frozenset())] == 1.0


def test_smaller_byte_total_does_not_decrease_counter() -> None:
    exporter = Exporter("peer-00", "lab", "f", 1.0)
    exporter.observe_round(record(1, 1000, 1000, 0.1))
    exporter.observe_round(record(1, 200, 300, 0.1))  # a restarted run's first record
    exporter.observe_round(record(2, 700, 400, 0.1))
    values = samples(exporter.render().decode())
    assert values[("peerd_bytes_sent_total", frozenset())] == 1000 + 500
    assert values[("peerd_bytes_received_total", frozenset())] == 1000 + 100


def test_concurrent_observers_lose_nothing() -> None:
    exporter = Exporter("peer-00", "lab", "f", 1.0)

    def observe() -> None:
        for step in range(500):
            exporter.observe_rejected("PushSlice", "INVALID_ARGUMENT")
            exporter.observe_staleness(step % 3)

    threads = [threading.Thread(target=observe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = samples(exporter.render().decode())
    assert values[("peerd_rejected_messages_total",
                   frozenset({("rpc", "PushSlice"), ("code", "INVALID_ARGUMENT")}))] == 4000.0
    assert values[("peerd_merged_slice_staleness_rounds_count", frozenset())] == 4000.0
