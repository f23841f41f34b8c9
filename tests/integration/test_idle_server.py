"""A server left idle keeps its memory: every Kafka client it holds is served.

librdkafka queues a statistics event (some KiB) each second on every client and keeps it until
the application polls that client; a client polled only when it has work (the socket's submit
producer, the standbys' report producer on the active) grew the server's RSS by about 7 KiB a
second (issue 14). A client served logs its connection's first state once, so each of them must
say "connected" although it never sent anything.
"""

from __future__ import annotations

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.kafka


def test_every_kafka_client_of_an_idle_active_server_is_served(cluster: Cluster) -> None:
    cluster.start_server()
    for client in ("server-socket producer", "server reports producer", "server transactional producer",
                   "server-2 transactional producer", "server-markers producer", "server consumer",
                   "server-tasks consumer", "server election consumer"):
        cluster.wait_for(lambda: f"kafka {client}: broker connection connected" in cluster.log("server"),
                         f"the {client} to be served")
