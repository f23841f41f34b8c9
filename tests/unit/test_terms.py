"""The active servers' terms (DESIGN 13): recorded in the store, shown by stats, monitor and
workers; the standbys' reports on ``leader``."""

from __future__ import annotations

from pathlib import Path

import pytest

from yadtqd import messages as m
from yadtqd import protocol
from yadtqd.ctl.monitor import render
from yadtqd.ctl.output import server_lines
from yadtqd.errors import BadMessage
from yadtqd.store import Store
from yadtqd.store.terms import KEEP
from tests.unit.test_monitor_render import snap

KILLED = "ended without stepping down (killed, frozen or cut off from the broker)"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "db.sqlite", create=True)


def test_no_term_yet_means_no_active_and_no_takeover(store: Store) -> None:
    assert protocol.servers_view(store.last_terms()) == {"active": None, "last_takeover": None}


def test_the_first_term_is_the_first_active_server(store: Store) -> None:
    with store.transaction():
        assert store.begin_term("a", "host-a", 10, 100.0, 0.5, KILLED) == 1
    view = protocol.servers_view(store.last_terms())
    assert view["active"] == {"server": "a", "host": "host-a", "pid": 10, "term": 1,
                              "since": protocol.iso(100.0)}
    assert view["last_takeover"]["from"] is None
    assert view["last_takeover"]["why"] == "the first active server"


def test_a_takeover_says_from_whom_and_why(store: Store) -> None:
    with store.transaction():
        store.begin_term("a", "host-a", 10, 100.0, 0.5, KILLED)
        store.begin_term("b", "host-b", 20, 200.0, 6.8, KILLED)  # a never stepped down
    takeover = protocol.servers_view(store.last_terms())["last_takeover"]
    assert takeover == {"at": protocol.iso(200.0), "server": "b", "term": 2, "took": 6.8,
                        "from": "a", "why": KILLED}


def test_a_term_ended_by_its_server_keeps_its_own_reason(store: Store) -> None:
    with store.transaction():
        store.begin_term("a", "host-a", 10, 100.0, 0.5, KILLED)
        store.end_term(1, 150.0, "stopped (SIGTERM)")
    assert protocol.servers_view(store.last_terms())["active"] is None  # nobody serves now
    with store.transaction():
        store.begin_term("b", "host-b", 20, 151.0, 1.6, KILLED)
    view = protocol.servers_view(store.last_terms())
    assert view["last_takeover"]["why"] == "stopped (SIGTERM)"
    assert view["active"]["server"] == "b"


def test_only_the_newest_terms_are_kept(store: Store) -> None:
    with store.transaction():
        for n in range(KEEP + 7):
            store.begin_term(f"s{n}", "h", n, float(n), 0.1, KILLED)
    terms = store.last_terms(1000)
    assert len(terms) == KEEP and terms[0]["term"] == KEEP + 7 and terms[-1]["term"] == 8


def test_terms_are_replicated_like_every_row(store: Store, tmp_path: Path) -> None:
    store.capture()
    with store.transaction():
        store.begin_term("a", "host-a", 10, 100.0, 0.5, KILLED)
    changes, _ = store.pending_changes()
    replica = Store(tmp_path / "replica.sqlite", create=True)
    with replica.transaction():
        replica.apply_changes(changes)
    assert [dict(r) for r in replica.last_terms()] == [dict(r) for r in store.last_terms()]


SERVER = {"name": "b", "role": "active", "lag": 0, "lag_seconds": 0.0,
          "standbys": [{"server": "a", "host": "host-a", "pid": 10, "lag": 12, "lag_seconds": 0.25,
                        "heard": 0.4}],
          "active": {"server": "b", "host": "host-b", "pid": 20, "term": 2, "since": "2026-12-01T20:00:00.000+00:00"},
          "last_takeover": {"at": "2026-12-01T20:00:00.000+00:00", "server": "b", "term": 2, "took": 6.8,
                            "from": "a", "why": KILLED}}


def test_the_lines_name_the_active_each_standby_and_the_last_takeover() -> None:
    lines = server_lines(SERVER)
    assert lines[0] == "this server: b, active"
    assert "active server: b on host-b (pid 20), term 2, since 2026-12-01T20:00:00.000+00:00" in lines
    assert "standby a on host-a: lag 12 records (0.25 s), heard 0.4 s ago" in lines
    assert f"last takeover: 2026-12-01T20:00:00.000+00:00, b from a in 6.8 s ({KILLED})" in lines


def test_a_standby_says_its_own_lag() -> None:
    standby = {**SERVER, "name": "a", "role": "standby", "lag": -1, "lag_seconds": None, "standbys": []}
    assert server_lines(standby)[0] == "this server: a, standby, lag unknown"
    standby.update(lag=3, lag_seconds=1.5)
    assert server_lines(standby)[0] == "this server: a, standby, lag 3 records (1.5 s)"


def test_the_monitor_shows_the_servers() -> None:
    frame = render({**snap(1.0, 0, 0), "server": SERVER}, None, 200, 40, 1.0)
    assert "standby a on host-a: lag 12 records" in frame and "last takeover:" in frame


def test_a_standby_report_round_trips_and_bad_ones_are_named() -> None:
    report = m.StandbyReport(server="a", host="h", pid=1, ts=5.0, lag=3, lag_seconds=0.5)
    assert m.parse_report(m.encode(report)) == report
    with pytest.raises(BadMessage, match="invalid standby report"):
        m.parse_report(b'{"type": "standby", "server": "a"}')
    with pytest.raises(BadMessage):
        m.parse_report(b"not json")
