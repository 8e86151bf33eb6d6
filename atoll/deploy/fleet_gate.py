"""The fleet gate: the only door of the coordinator that sites can reach.

Flower 1.42 serves its Fleet API (what SuperNodes use), its Control API (what ``flwr``
uses: start, stop and list runs, register and unregister nodes) and its Runtime API (what
the ServerApp uses) on one HTTP port, and only the Fleet API asks who is calling. Anyone
who reaches that port, a registered site included, could stop the federation's run or
start their own app on every site. So ``atoll coordinator`` binds the SuperLink to
loopback and puts this gate on the public address: it terminates TLS with the
coordinator's certificate and forwards a request only when it is a ``POST`` to one of
the Fleet API's endpoints (``/v1/fleet/<name>``); anything else is answered 403 and
written to the gate's log with the caller's address. Bodies stream both ways, so a large
payload is never held whole here.

Run as ``python -m atoll.deploy.fleet_gate --listen HOST:PORT --upstream HOST:PORT``
(``--cert``/``--key``/``--ca`` for TLS on both sides).
"""

from __future__ import annotations

import argparse
import re
import ssl
import sys
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
"""A Fleet API endpoint, and nothing that could be read as another path (no dots,
slashes, percent escapes or query)."""
HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
              "upgrade", "proxy-authorization", "proxy-connection"}
REFUSED = "atoll: only the Fleet API is served on this port\n"
LOGGED_REFUSALS = 100
"""Refusals written one by one; after that one line per thousand, so a caller that hammers
the port cannot fill the coordinator's disk."""


@dataclass
class GateConfig:
    """Where the gate listens, where the SuperLink is, and the TLS material for both."""

    listen_host: str
    listen_port: int
    upstream: str
    """The SuperLink, ``127.0.0.1:PORT``."""
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    """The federation's CA: the SuperLink's certificate is checked against it."""

    @property
    def tls(self) -> bool:
        """Whether the gate serves (and reaches the SuperLink over) TLS."""
        return self.cert is not None


def is_fleet_request(method: str, raw_path: bytes, query: bytes) -> bool:
    """Whether a request may pass: a ``POST`` to one Fleet API endpoint, exactly."""
    return method == "POST" and not query and \
        FLEET_PATH.fullmatch(raw_path.decode("latin-1")) is not None


def _upstream_client(cfg: GateConfig) -> httpx.AsyncClient:
    scheme = "https" if cfg.tls else "http"
    verify: ssl.SSLContext | bool = False
    if cfg.tls:
        verify = ssl.create_default_context(cafile=cfg.ca)
    # No timeout on reading: a Fleet call answers as soon as the SuperLink has it, and a
    # large object may take long on the site's link; connecting to loopback must be quick.
    timeout = httpx.Timeout(None, connect=10.0)
    return httpx.AsyncClient(base_url=f"{scheme}://{cfg.upstream}", verify=verify,
                             timeout=timeout, trust_env=False)


def build(cfg: GateConfig) -> Starlette:
    """The gate as an ASGI app: forward Fleet calls to the SuperLink, refuse the rest."""
    client = _upstream_client(cfg)
    refusals = 0

    async def gate(request: Request) -> Response:
        nonlocal refusals
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        if not is_fleet_request(request.method, raw_path, request.scope["query_string"]):
            refusals += 1
            if refusals <= LOGGED_REFUSALS or refusals % 1000 == 0:
                who = request.client.host if request.client else "?"
                print(f"refused {request.method} {raw_path.decode('latin-1')[:200]!r} from "
                      f"{who}: not a Fleet API call ({refusals} refused so far)", flush=True)
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        upstream = client.build_request("POST", raw_path.decode("latin-1"), headers=headers,
                                        content=request.stream())
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            print(f"SuperLink unreachable for {raw_path.decode('latin-1')}: {e}", flush=True)
            return PlainTextResponse("atoll: coordinator unavailable\n", status_code=503)
        back = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP
                and k.lower() != "content-length"}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                 headers=back, background=BackgroundTask(reply.aclose))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    routes = [Route("/{anything:path}", gate, methods=methods), Route("/", gate, methods=methods)]
    return Starlette(routes=routes)


def serve(cfg: GateConfig) -> None:
    """Serve the gate until interrupted."""
    uvicorn.run(build(cfg), host=cfg.listen_host, port=cfg.listen_port,
                ssl_certfile=cfg.cert, ssl_keyfile=cfg.key, log_level="warning",
                access_log=False, workers=1, ws="none")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """``python -m atoll.deploy.fleet_gate``: parse the addresses and serve."""
    p = argparse.ArgumentParser(prog="python -m atoll.deploy.fleet_gate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT the sites connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--cert", help="server certificate (PEM); TLS when given")
    p.add_argument("--key", help="its private key (PEM)")
    p.add_argument("--ca", help="CA certificate the SuperLink's certificate is checked with")
    a = p.parse_args(argv)
    host, port = _address(a.listen)
    if (a.cert is None) != (a.key is None):
        p.error("--cert and --key go together")
    serve(GateConfig(host, port, a.upstream, a.cert, a.key, a.ca))
    return 0


if __name__ == "__main__":
    sys.exit(main())
