"""`python -m tandem.deploy.child KIND`: one child of a local deployment (KIND: worker or
frontend), configured by the JSON spec (`tandem.deploy.specs`) on its stdin.

`tandem worker` and `tandem frontend` turn their flags into the same specs and call the same
`run_worker` / `run_frontend`, so a supervised child and a hand-started one cannot drift.
"""

from __future__ import annotations

import logging
import sys

import msgspec

from tandem.deploy.specs import FrontendSpec, WorkerSpec, decode
from tandem.runtime import event_loop

log = logging.getLogger("tandem")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_worker(spec: WorkerSpec) -> int:
    """Serve until drained (0), or until the engine dies (1: the supervisor restarts it);
    2 (not restarted) when the spec would serve beyond loopback without a cluster secret or
    the engine refuses its settings."""
    from tandem.runtime.framing import cluster_secret
    from tandem.runtime.tcp_plane import is_loopback

    if not (cluster_secret() or spec.insecure or is_loopback(spec.host)):
        print(
            f"tandem worker: error: --host {spec.host} without a cluster secret would serve"
            " any peer that reaches it; set TANDEM_CLUSTER_SECRET (or --cluster-secret) on"
            " every component, or pass --insecure",
            file=sys.stderr,
        )
        return 2
    from tandem.engine import open_engine
    from tandem.transfer.nixl import NixlError
    from tandem.worker import model_card
    from tandem.worker.kv_transport import transport_names
    from tandem.worker.service import serve_worker

    config = spec.engine
    log.info("loading %s on %s (dtype %s)", config.model, config.device, config.dtype)
    try:
        engine = open_engine(config, spec.role)
    except ValueError as exc:  # settings the engine refuses: a restart would fail alike
        print(f"tandem worker: error: {exc}", file=sys.stderr)
        return 2
    try:
        transport_names(config.kv_transport, engine)
    except ValueError as exc:
        engine.shutdown()
        print(f"tandem worker: error: {exc}", file=sys.stderr)
        return 2
    try:
        return event_loop.run(
            serve_worker(
                engine,
                model_card(engine, spec.served, role=spec.role),
                spec.nats,
                host=spec.host,
                port=spec.port,
                advertise_host=spec.advertise_host,
                insecure=spec.insecure,
                namespace=spec.namespace,
                lease_ttl=spec.lease_ttl,
                drain_timeout=spec.drain_timeout,
                instance_id=spec.instance_id,
                kv_transport=config.kv_transport,
            )
        )
    except NixlError as exc:  # --kv-transport nixl, and NIXL cannot take this cache
        print(f"tandem worker: error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()


def run_frontend(spec: FrontendSpec) -> int:
    """Serve HTTP until a signal stops it (0); 2 when the port cannot be had."""
    from tandem.frontend.service import serve_frontend
    from tandem.http.server import bind_or_report, url_host

    sock = bind_or_report(spec.host, spec.port, "frontend", spec.reuse_port)
    if sock is None:
        return 2
    with sock:
        event_loop.run(
            serve_frontend(
                spec.nats,
                sock,
                url=f"http://{url_host(spec.host)}:{spec.port}",
                served_model_name=spec.served,
                tokenizer=spec.tokenizer,
                api_key=spec.api_key,
                max_waiting=spec.max_waiting,
                max_request_bytes=spec.max_request_bytes,
                max_client_rate=spec.max_client_rate,
                namespace=spec.namespace,
                min_workers=spec.min_workers,
                min_prefill_workers=spec.min_prefill_workers,
                log_level=spec.log_level,
                policy=spec.policy,
                router_options=spec.router_options,
                disagg=spec.disagg,
                migration_limit=spec.migration_limit,
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tandem.deploy.child worker|frontend < SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = decode(argv[0], sys.stdin.buffer.read())
    except (ValueError, msgspec.DecodeError) as exc:  # ValidationError is a DecodeError
        print(f"tandem {argv[0]}: error: bad spec: {exc}", file=sys.stderr)
        return 2
    setup_logging(spec.log_level)
    return run_worker(spec) if isinstance(spec, WorkerSpec) else run_frontend(spec)


if __name__ == "__main__":
    raise SystemExit(main())
