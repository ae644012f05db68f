"""Run one service (gateway, orchestrator or worker) in this process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aiohttp import web

from haif.control.config import CoreConfig


def run_service(kind: str, args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {kind} %(levelname)s %(name)s: %(message)s"
    )
    if kind == "orchestrator":
        from haif.runtime import orchestrator
        from haif.runtime.cluster import load_cluster
        from haif.runtime.store import DuckDBStore

        config = load_cluster(args.config).policy if args.config else CoreConfig()
        orch = orchestrator.Orchestrator(config, DuckDBStore(Path(args.store)), seed=args.seed)
        app = orchestrator.build_app(orch)
    elif kind == "worker":
        from haif.runtime import worker

        spec = worker.WorkerSpec(
            worker_id=args.worker_id,
            region=args.region,
            url=f"http://{args.host}:{args.port}",
            orchestrator_url=args.orchestrator,
            gpu_class=args.gpu_class,
            capacity=args.capacity,
            models=tuple(m for m in args.models.split(",") if m),
            mean_s=args.mean_s,
            ttft_s=args.ttft_s,
            heartbeat_s=args.heartbeat_s,
        )
        app = worker.build_app(worker.Worker(spec))
    elif kind == "gateway":
        from haif.runtime import gateway

        app = gateway.build_app(gateway.Gateway(args.orchestrator, args.region))
    else:
        raise ValueError(f"unknown service {kind!r}")
    web.run_app(app, host=args.host, port=args.port, print=None, shutdown_timeout=5.0)
    return 0
