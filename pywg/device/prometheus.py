"""A Prometheus collector over a device's metrics snapshot (prometheus-client): every
scrape takes one snapshot (pywg.device.metrics), so the figures of one scrape are
consistent and nothing is counted twice. Peers are labelled by their base64 public key
(public; no secret is ever exported)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .metrics import DeviceMetrics

PEER_COUNTERS = (  # (metric name without pywg_peer_ and _total, PeerMetrics field, help)
    ("rx_bytes", "rx_bytes", "Bytes of authenticated transport messages received from the peer"),
    ("tx_bytes", "tx_bytes", "Bytes of transport messages sent to the peer"),
    ("rx_packets", "rx_packets", "Authenticated transport messages received from the peer"),
    ("tx_packets", "tx_packets", "Transport messages sent to the peer"),
    ("handshakes_initiated", "handshakes_initiated", "Handshake initiations sent, retries included"),
    ("handshakes_completed", "handshakes_completed", "Handshakes completed"),
    ("handshakes_timed_out", "handshakes_timed_out", "Initiations unanswered after REKEY_TIMEOUT"),
    ("sessions_expired", "sessions_expired", "Sessions whose keys were forgotten without a new handshake"),
    ("unreachable", "unreachable", "Times the handshake gave up (MAX_TIMER_HANDSHAKES retries)"),
)


class DeviceCollector(Collector):
    """Register with a CollectorRegistry; ``snapshot`` is ``Device.metrics`` (thread-safe,
    so a scrape from the exporter's thread is fine)."""

    def __init__(self, snapshot: Callable[[], DeviceMetrics]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot()
        labels = ["interface", "peer"]
        families = {name: CounterMetricFamily(f"pywg_peer_{name}", text, labels=labels)
                    for name, _, text in PEER_COUNTERS}
        last = GaugeMetricFamily("pywg_peer_last_handshake_seconds",
                                 "UNIX time of the last completed handshake (0: none)", labels=labels)
        path = GaugeMetricFamily("pywg_peer_path", "1 for the path the peer is reached on now",
                                 labels=[*labels, "path"])
        for peer in m.peers:
            values = [m.interface, base64.b64encode(peer.public_key).decode()]
            for name, attribute, _ in PEER_COUNTERS:
                families[name].add_metric(values, getattr(peer, attribute))
            last.add_metric(values, peer.last_handshake or 0.0)
            if peer.path is not None:
                path.add_metric([*values, peer.path.value], 1)
        yield from families.values()
        yield last
        yield path
        drops = CounterMetricFamily("pywg_drops", "Packets and datagrams dropped, by reason and direction",
                                    labels=["interface", "reason", "direction"])
        for (reason, direction), n in m.drops.items():
            drops.add_metric([m.interface, reason.value, direction.value], n)
        yield drops
