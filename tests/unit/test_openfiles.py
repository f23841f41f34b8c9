"""The open-files arithmetic and refusal (yadtqd/openfiles.py); raising the limit for real is
tested with real daemons (tests/integration/test_open_files.py)."""

from __future__ import annotations

import resource

import pytest

from yadtqd import openfiles
from yadtqd.errors import ConfigError


def test_what_slots_and_connections_need() -> None:
    assert openfiles.worker_needs(200) == 256 + 5 * 201  # over systemd's soft 1,024
    assert openfiles.server_needs(64) == 256 + 4 * 65


def test_enough_already_changes_nothing() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert openfiles.ensure(1, "one file") == before[0]
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_more_than_the_hard_limit_is_a_config_error_naming_both() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = before[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(ConfigError) as refused:
        openfiles.ensure(hard + 1, "[worker] slots = 99999")
    assert f"[worker] slots = 99999 needs about {hard + 1} open files" in str(refused.value)
    assert f"at most {hard}" in str(refused.value) and "LimitNOFILE=" in str(refused.value)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
