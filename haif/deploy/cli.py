"""``haif deploy``: the command line (the work is in :mod:`haif.deploy.commands`).

Imported by ``haif``'s parser, so it imports nothing heavy (asyncssh) itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from haif.configfile import ConfigError

ACTIONS = ("status", "logs", "stop", "upgrade")


def _cmd_deploy(args: argparse.Namespace) -> int:
    words: list[str] = list(args.words)
    action = words.pop(0) if words and words[0] in ACTIONS else "deploy"
    if not words:
        raise ConfigError(f"haif deploy {action}: name the deploy YAML")
    path, rest = words[0], words[1:]
    if action == "logs" and len(rest) != 1:
        raise ConfigError("haif deploy logs CLUSTER.yaml SERVICE: name one service")
    if action != "logs" and rest:
        raise ConfigError(f"haif deploy {action}: unexpected {' '.join(rest)}")
    from haif.deploy import commands
    from haif.deploy.config import PLAIN_HTTP_WARNING, load_deploy

    plan = load_deploy(path)
    if not plan.tls:
        print(PLAIN_HTTP_WARNING, file=sys.stderr, flush=True)
    try:
        if action == "deploy":
            return asyncio.run(commands.deploy(plan))
        if action == "upgrade":
            return asyncio.run(commands.upgrade(plan))
        if action == "status":
            return asyncio.run(commands.status(plan))
        if action == "stop":
            return asyncio.run(commands.stop(plan))
        return asyncio.run(commands.logs(plan, rest[0], args.follow, args.lines))
    except KeyboardInterrupt:
        return 130


def add_deploy_command(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "deploy",
        help="deploy a cluster to machines over SSH; status, logs, upgrade, stop",
        description="Deploy the cluster a deploy YAML describes (hosts reached over SSH, "
        "host keys checked against a known-hosts file; the services each runs) with "
        "mutual TLS between the services: build haif's wheel, copy it with its "
        "dependencies, the configuration, keys and model artifacts, make a virtualenv on "
        "each host, start the services under a supervisor that outlives SSH and wait until "
        "each is healthy. status: each service's state and health; logs SERVICE: its log "
        "(SERVICE or HOST:SERVICE); upgrade: a rolling upgrade to this checkout (workers "
        "drained one at a time, then the orchestrators, then the gateways); stop: stop "
        "everything (gateways first).",
        usage="haif deploy [status|logs|stop|upgrade] CLUSTER.yaml [SERVICE] [-f] [-n N]",
    )
    p.add_argument(
        "words",
        nargs="+",
        metavar="[ACTION] CLUSTER.yaml [SERVICE]",
        help="an action (none: deploy; status, logs, stop, upgrade), the deploy YAML, and "
        "for logs the service",
    )
    p.add_argument("-f", "--follow", action="store_true", help="logs: keep streaming")
    p.add_argument(
        "-n", "--lines", type=int, default=100, help="logs: lines of the end shown (default 100)"
    )
    p.set_defaults(func=_cmd_deploy)
