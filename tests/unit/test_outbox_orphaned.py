"""A worker whose events producer knows no broker any more stops, for systemd to start it
again: that producer would never connect again (librdkafka 2.16 after a lone broker's stop)."""

from __future__ import annotations

import pytest

from yadtqd import config as configuration
from yadtqd.errors import UnreachableError
from yadtqd.transport import ConnectionMonitor
from yadtqd.worker.lease import Lease
from yadtqd.worker.outbox import Outbox


def test_an_orphaned_producer_stops_the_worker() -> None:
    config = configuration.load(None, env={"YADTQ_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    outbox = Outbox(config, "w1", 0, Lease(), current_epoch=lambda: "e")
    outbox.poll()  # no broker reached yet: nothing to say
    orphaned = ConnectionMonitor("worker producer")
    orphaned.orphaned = True  # what the statistics say after 3 s without a broker (fixed: the
    outbox.monitor = orphaned  # live one would be reset by the next statistics poll serves)
    with pytest.raises(UnreachableError, match="knows no broker"):
        outbox.poll()
    outbox.producer.purge()
