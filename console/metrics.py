"""/metrics: the counters every process of the mail path added to the database (gateway.metrics), with
the queue's depth and the SMTP connections read at the time of the scrape, in the Prometheus text format."""

from __future__ import annotations

import ipaddress
from collections import defaultdict

from django.conf import settings
from django.db.models import Count
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from gateway.mailqueue.listing import queued
from gateway.metrics import parse_labels
from gateway.models import MetricTotal, NodeHeartbeat

COUNTERS = {
    "mailgate_messages_accepted": ("Messages accepted (answered 250 after their commit)", ()),
    "mailgate_messages_refused": ("Attempts refused at SMTP time, by reason", ("reason",)),
    "mailgate_verdicts": ("Scan verdicts", ("verdict",)),
    "mailgate_deliveries": ("Delivery outcomes, per recipient and attempt", ("outcome",)),
    "mailgate_scanner_errors": ("Scans deferred because a scanner did not answer", ("scanner",)),
    "mailgate_smtp_connections": ("SMTP connections opened", ()),
}
HISTOGRAMS = {
    "mailgate_scan_seconds": "Time the scanners took for one message",
    "mailgate_delivery_seconds": "From the message's receipt to the downstream server's acceptance",
}


class StoredMetrics:
    """A prometheus_client collector over MetricTotal and the live state of the queue and of the nodes."""

    def collect(self):
        rows = list(MetricTotal.objects.values_list("node", "name", "labels", "value"))
        counters = {name: CounterMetricFamily(name, doc, labels=("node", *labels))
                    for name, (doc, labels) in COUNTERS.items()}
        for node, name, labels, value in rows:
            if name in counters:
                known = COUNTERS[name][1]
                parsed = parse_labels(labels)
                counters[name].add_metric([node, *(parsed.get(label, "") for label in known)], value)
        yield from counters.values()
        for name, doc in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, doc, labels=("node",))
            buckets: dict[str, list[tuple[str, float]]] = defaultdict(list)
            sums: dict[str, float] = {}
            for node, row_name, labels, value in rows:
                if row_name == f"{name}_bucket":
                    buckets[node].append((parse_labels(labels)["le"], value))
                elif row_name == f"{name}_sum":
                    sums[node] = value
            for node, values in sorted(buckets.items()):
                values.sort(key=lambda pair: float(pair[0]))
                family.add_metric([node], values, sum_value=sums.get(node, 0.0))
            yield family
        depth = GaugeMetricFamily("mailgate_queue_depth", "Recipients in the mail queue, by state", labels=("state",))
        for row in queued().order_by().values("queue_state").annotate(n=Count("id")):
            depth.add_metric([row["queue_state"]], row["n"])
        yield depth
        now = timezone.now()
        open_ = GaugeMetricFamily("mailgate_smtp_connections_open", "SMTP connections open now, as of the last "
                                  "heartbeat", labels=("node",))
        age = GaugeMetricFamily("mailgate_heartbeat_age_seconds", "Seconds since each process's last heartbeat",
                                labels=("node", "kind", "pid"))
        connections: dict[str, int] = defaultdict(int)
        for beat in NodeHeartbeat.objects.all():
            age.add_metric([beat.node, beat.kind, str(beat.pid)], (now - beat.seen_at).total_seconds())
            if beat.smtp_connections is not None:
                connections[beat.node] += beat.smtp_connections
        for node, count in sorted(connections.items()):
            open_.add_metric([node], count)
        yield open_
        yield age


def exposition() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoredMetrics())
    return generate_latest(registry)


def allowed(client_ip: str | None, authorization: str) -> bool:
    """A scrape with the token (Authorization: Bearer METRICS_TOKEN), or from an address of METRICS_ALLOW."""
    import hmac

    token = settings.METRICS_TOKEN
    if token and authorization.startswith("Bearer ") and hmac.compare_digest(
            authorization[len("Bearer "):].strip().encode(), token.encode()):
        return True
    if not client_ip:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    for allowed_net in settings.METRICS_ALLOW:
        try:
            if address in ipaddress.ip_network(allowed_net, strict=False):
                return True
        except ValueError:
            continue  # a malformed entry allows nothing (docs/operations.md)
    return False
