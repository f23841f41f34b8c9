"""``yadtqd server|worker [--config PATH] [--log-level LEVEL]``: the daemon's entry point."""

from __future__ import annotations

import argparse
import logging
import sys

import yadtqd
from yadtqd import config as configuration
from yadtqd import log as logsetup
from yadtqd.errors import YadtqError
from yadtqd.systemd import Notifier


def parser() -> argparse.ArgumentParser:
    """The daemon's command line."""
    p = argparse.ArgumentParser(
        prog="yadtqd", description="YADTQ daemon: the server or a worker of a YADTQ cluster.",
        epilog="Configuration: --config, else $YADTQ_CONFIG, else /etc/yadtq/yadtq.toml; "
               "YADTQ_<SECTION>_<KEY> environment variables override the file. "
               "Exit status 78: the configuration is invalid.")
    p.add_argument("role", choices=("server", "worker"), help="which role to run")
    p.add_argument("--config", metavar="PATH", help="TOML configuration file")
    p.add_argument("--log-level", choices=configuration.LOG_LEVELS, help="lowest priority logged")
    p.add_argument("--version", action="version", version=f"yadtqd {yadtqd.__version__}")
    return p


#: Seconds a thread holds the GIL while another waits for it (Python's default is 5 ms): a
#: thread woken by Kafka or a socket gets it within this, not within 5 ms of the loop's work.
SWITCH_INTERVAL = 0.0005


def main(argv: list[str] | None = None) -> int:
    """Run one role until it stops; return its exit status."""
    args = parser().parse_args(argv)
    try:
        config = configuration.load(args.config, flags={"log_level": args.log_level})
        from yadtqd.transport import check_settings  # here: --help stays free of librdkafka

        check_settings(config)
        worker_id = config.worker.worker_id if args.role == "worker" else ""
        logsetup.setup(config.logging.level, config.logging.file, args.role, worker_id)
    except YadtqError as exc:
        print(f"yadtqd: {exc}", file=sys.stderr)
        return exc.exit_code
    notifier = Notifier()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        if args.role == "server":
            from yadtqd.server.main import Server

            return Server(config, notifier).run()
        from yadtqd.worker.main import Worker

        return Worker(config, notifier).run()
    except YadtqError as exc:
        logging.getLogger("yadtqd").critical("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
