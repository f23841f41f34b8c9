"""Configuration: precedence, every error path, librdkafka passthrough."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from yadtqd import config as configuration
from yadtqd.errors import ConfigError

BASE = '[kafka]\n"bootstrap.servers" = "file:9092"\n'


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "yadtq.toml"
    path.write_text(text)
    return path


def test_defaults_with_only_the_required_key(tmp_path: Path) -> None:
    config = configuration.load(_file(tmp_path, BASE), env={})
    assert config.kafka == {"bootstrap.servers": "file:9092"}
    assert config.topic_prefix == "yadtq"
    assert config.topic("tasks") == "yadtq.tasks"
    assert config.server.heartbeat_timeout == 5.0
    assert config.worker.heartbeat_interval == 1.0
    assert config.logging.level == "info"


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = _file(tmp_path, 'topic_prefix = "fromfile"\n' + BASE + '[server]\nheartbeat_timeout = 7\n'
                 '[logging]\nlevel = "warning"\n[worker]\nslots = 3\n')
    env = {"YADTQ_KAFKA_BOOTSTRAP_SERVERS": "env:9092", "YADTQ_SERVER_HEARTBEAT_TIMEOUT": "2.5",
           "YADTQ_LOGGING_LEVEL": "error", "YADTQ_TOPIC_PREFIX": "fromenv"}
    config = configuration.load(path, env=env, flags={"log_level": "debug"})
    assert config.kafka["bootstrap.servers"] == "env:9092"
    assert config.server.heartbeat_timeout == 2.5
    assert config.logging.level == "debug"
    assert config.topic_prefix == "fromenv"
    assert config.worker.slots == 3  # from the file, nothing overrides it


def test_config_path_from_environment_variable(tmp_path: Path) -> None:
    path = _file(tmp_path, BASE + '[worker]\nid = "named"\n')
    config = configuration.load(None, env={"YADTQ_CONFIG": str(path)})
    assert config.worker.worker_id == "named"
    assert config.source == str(path)


def test_librdkafka_settings_pass_through_unchanged(tmp_path: Path) -> None:
    path = _file(tmp_path, BASE + '"security.protocol" = "SASL_SSL"\n"sasl.mechanisms" = "PLAIN"\n'
                 '"socket.keepalive.enable" = true\n"message.max.bytes" = 2000000\n')
    config = configuration.load(path, env={"YADTQ_KAFKA_SSL_CA_LOCATION": "/etc/ca.pem"})
    assert config.kafka == {"bootstrap.servers": "file:9092", "security.protocol": "SASL_SSL",
                            "sasl.mechanisms": "PLAIN", "socket.keepalive.enable": True,
                            "message.max.bytes": 2000000, "ssl.ca.location": "/etc/ca.pem"}


@pytest.mark.parametrize(("text", "env", "words"), [
    ("bogus = 1\n" + BASE, {}, "unknown key 'bogus'"),
    (BASE + "[server]\nheartbeat_timout = 5\n", {}, "[server] heartbeat_timout: unknown key 'heartbeat_timout'"),
    (BASE + "[nonsense]\nx = 1\n", {}, "unknown key 'nonsense'"),
    (BASE + "[worker]\nslots = \"two\"\n", {}, "[worker] slots: expected an integer, got a string"),
    (BASE + "[worker]\nslots = true\n", {}, "expected an integer, got a boolean"),
    (BASE + "[server]\nheartbeat_timeout = \"5s\"\n", {}, "expected a number, got a string"),
    (BASE + "[server]\nheartbeat_timeout = 0\n", {}, "must be at least 0.1"),
    (BASE + "[logging]\nlevel = \"loud\"\n", {}, "must be one of debug, info, warning"),
    (BASE + "[worker]\nplugins = \"arith\"\n", {}, "expected an array of strings"),
    (BASE + "[kafka.nested]\nx = 1\n", {}, "librdkafka settings must be strings, numbers or booleans"),
    ("server = 5\n" + BASE, {}, "[server] must be a table"),
    ("[server]\n", {}, 'missing required [kafka] "bootstrap.servers"'),
    ("not toml at all [", {}, "not valid TOML"),
    (BASE, {"YADTQ_WORKER_SLOTS": "many"}, "environment: YADTQ_WORKER_SLOTS: expected an integer"),
    (BASE, {"YADTQ_SERVER_NOPE": "1"}, "environment: YADTQ_SERVER_NOPE: unknown key 'nope'"),
])
def test_errors_name_the_key_and_the_source(tmp_path: Path, text: str, env: dict[str, str], words: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        configuration.load(path, env=env)
    assert words in str(caught.value)
    if not env:
        assert str(path) in str(caught.value)
    assert caught.value.exit_code == 78


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        configuration.load(tmp_path / "missing.toml", env={})


def test_environment_lists_are_comma_separated(tmp_path: Path) -> None:
    config = configuration.load(_file(tmp_path, BASE), env={"YADTQ_WORKER_PLUGINS": "arith, demo"})
    assert config.worker.plugins == ("arith", "demo")


def test_daemon_exits_78_naming_the_key(tmp_path: Path) -> None:
    path = _file(tmp_path, BASE + "[server]\nsokcet = \"/tmp/x\"\n")
    done = subprocess.run([sys.executable, "-m", "yadtqd.cli", "server", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert "unknown key 'sokcet'" in done.stderr
    assert "Traceback" not in done.stderr


def test_reference_lists_every_setting() -> None:
    text = configuration.reference()
    for section, cls in configuration.SECTIONS.items():
        for field in cls.__dataclass_fields__:
            assert f"# {field} = " in text, (section, field)
    assert "YADTQ_SERVER_HEARTBEAT_TIMEOUT" in text


def test_packaged_example_config_is_the_generated_reference() -> None:
    example = Path(__file__).resolve().parents[2] / "packaging" / "yadtq.toml"
    assert example.read_text().strip() == configuration.reference().strip(), \
        "regenerate with: python -m yadtqd.config > packaging/yadtq.toml"
