"""The health service's REST API: stdlib ``ThreadingHTTPServer`` in a thread, one ``do_<METHOD>_<path>`` per route.

As in Patroni's api.py, the status code *is* the answer (load balancers and Pacemaker-less monitors read codes,
not bodies); the JSON body explains it to a human.

* ``GET /health``: 200 when the local proxy is healthy, else 503.
* ``GET /active``: 200 only on the node that holds the VIP address (the kernel's address list), else 503.
* ``GET /cluster``: Pacemaker's view (``crm_mon`` XML parsed) plus this service's history; 503 when Pacemaker
  cannot be read (the service's own part is still in the body).
* ``GET /metrics``: Prometheus text.
* ``POST /switchover`` ``{"to": "node2"}`` (optional ``to``) and ``POST /maintenance``
  ``{"node": "node1", "on": true}`` (no ``node``: cluster-wide maintenance-mode): mutating.

Mutating calls need ``Authorization: Bearer <token>`` (token from ``rest.token_file``, compared with
:func:`hmac.compare_digest`) and are refused with 403 on a plain-HTTP listener bound to a non-loopback address,
because there the token itself would cross the network in clear. Every bad request is a 4xx JSON
``{"error": "..."}`` answered *before* any side effect: 404 unknown path, 405 wrong method, 401 missing or bad
token, 400 bad JSON or unknown node, 413 body too large.

Pacemaker is reached only through a :class:`ha.health.cluster.ClusterActions` object, so the API's unit tests run
against a real HTTP server with a recording actions object; the real Pacemaker boundary is crossed by the lab
integration test.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ha.health.cluster import ActionError, ClusterActions, VipCheck
from ha.health.metrics import Metrics
from ha.model import Cluster

log = logging.getLogger("sipha.health.api")
MAX_BODY = 64 * 1024
MIN_TOKEN_CHARS = 43  # secrets.token_urlsafe(32): 256 bits of randomness
GET_PATHS = ("health", "active", "cluster", "metrics")
POST_PATHS = ("switchover", "maintenance")


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def mutations_allowed(bind: str, tls: bool) -> tuple[bool, str]:
    """May this listener accept mutating calls? Only over TLS or on a loopback address."""
    if tls:
        return True, "TLS listener"
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False, f"bind address {bind!r} is not an IP address"
    if loopback:
        return True, "plain HTTP on loopback"
    return False, f"plain HTTP on non-loopback {bind}: the token would cross the network in clear; configure rest.tls"


def read_token(path: Path) -> str | None:
    """The API token, or None when the file is missing, unreadable or too short to hold 256 random bits."""
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token if len(token) >= MIN_TOKEN_CHARS else None


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class ApiServer(ThreadingHTTPServer):
    """Holds what the handlers need; one thread per request (daemon threads: shutdown never waits on a client)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        cluster: Cluster,
        node: str,
        health: Callable[[], dict[str, Any]],
        actions: ClusterActions,
        metrics: Metrics,
        vip_check: VipCheck,
        token_file: Path,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.cluster = cluster
        self.node = node
        self.health = health
        self.actions = actions
        self.metrics = metrics
        self.vip_check = vip_check
        self.token_file = token_file
        self.tls = tls
        self.mutations, self.mutations_why = mutations_allowed(address[0], tls is not None)
        self.action_lock = threading.Lock()  # one cluster change at a time
        super().__init__(address, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread, so a slow client cannot stall accept().
        if self.tls is not None:
            request.settimeout(Handler.timeout)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info("tls handshake failed peer=%s error=%s", client_address[0], exc)
                return
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    server_version = "sipha-health"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a client may take to send its request (slow clients do not pin threads forever)

    # ------------------------------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http peer=%s %s", self.client_address[0], format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, (json.dumps(obj, indent=1, default=str) + "\n").encode(), "application/json", headers)

    def _route(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/").lstrip("/")
        method = "GET" if self.command == "HEAD" else self.command
        try:
            allowed = [m for m in ("GET", "POST") if hasattr(self, f"do_{m}_{path}")] if path.isidentifier() else []
            if not allowed:
                raise HttpError(404, f"no such path /{path}")
            if method not in allowed:
                allow = ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))
                raise HttpError(405, f"/{path} takes {allow}", {"Allow": allow})
            if method != "POST":
                self._drain()  # a GET with a body must not leave it to be read as the next request
            getattr(self, f"do_{method}_{path}")()
        except HttpError as exc:
            self._drain()
            self._json(exc.status, {"error": exc.message}, exc.headers)
        except Exception as exc:  # a handler bug answers 500, never kills the server thread
            log.exception("api error path=/%s", path)
            self._json(500, {"error": f"internal error: {exc.__class__.__name__}"})

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = _route

    def _drain(self) -> None:
        """Read an unread body so the keep-alive connection stays in step; refuse to read a huge one."""
        if getattr(self, "_body_read", False):
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        if 0 < n <= MAX_BODY:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _body(self) -> dict[str, Any]:
        self._body_read = True
        raw_len = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(400, "chunked bodies are not accepted: send Content-Length")
        try:
            n = int(raw_len or 0)
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length {raw_len!r}") from None
        if n < 0:
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length {raw_len!r}")
        if n > MAX_BODY:
            self.close_connection = True
            raise HttpError(413, f"body larger than {MAX_BODY} bytes")
        data = self.rfile.read(n) if n else b""
        if not data.strip():
            return {}
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "body must be a JSON object")
        return obj

    def _authorize(self) -> None:
        """Mutations: refuse an insecure listener (403), then check the bearer token (401)."""
        if not self.server.mutations:
            raise HttpError(403, f"mutating calls refused: {self.server.mutations_why}")
        token = read_token(self.server.token_file)
        if token is None:
            raise HttpError(403, f"mutating calls disabled: no usable token in {self.server.token_file} "
                                 f"(need >= {MIN_TOKEN_CHARS} characters, e.g. `sipha health token FILE`)")
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="sipha"'}
        if scheme.lower() != "bearer" or not given.strip():
            raise HttpError(401, "missing bearer token", challenge)
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HttpError(401, "bad token", challenge)

    def _node(self, value: Any, field: str) -> str | None:
        if value is None:
            return None
        names = [n.name for n in self.server.cluster.nodes]
        if not isinstance(value, str) or value not in names:
            raise HttpError(400, f"{field}: unknown node {value!r} (nodes: {', '.join(names)})")
        return value

    def _action(self, what: str, fn: Callable[[], dict[str, Any]], **fields: Any) -> None:
        if not self.server.action_lock.acquire(blocking=False):
            raise HttpError(409, "another switchover/maintenance call is in progress")
        try:
            result = fn()
            status = 200
        except ActionError as exc:
            result, status = {"error": exc.message}, exc.status
        finally:
            self.server.action_lock.release()
        log.info("api_action action=%s peer=%s status=%d %s", what, self.client_address[0], status,
                 " ".join(f"{k}={v}" for k, v in fields.items()))
        self._json(status, result)

    # ------------------------------------------------------------------------------------------ routes

    def do_GET_health(self) -> None:
        h = self.server.health()
        self._json(200 if h.get("healthy") else 503, h)

    def do_GET_active(self) -> None:
        held = self.server.vip_check.held()
        h = self.server.health()
        body = {"node": self.server.node, "active": bool(held), "vips_held": held, "health": h.get("health")}
        if self.server.vip_check.error:
            body["error"] = self.server.vip_check.error
        self._json(200 if held else 503, body)

    def do_GET_cluster(self) -> None:
        h = self.server.health()
        body: dict[str, Any] = {"node": self.server.node, "cluster": self.server.cluster.name}
        status = 200
        try:
            pcmk = self.server.actions.status()
            body["pacemaker"] = pcmk
            vips = pcmk.get("vips", {})
            holder = next(iter(vips.values()), None) if vips else None
            body["vip_holder"] = holder  # a list when Pacemaker sees the VIP active on several nodes
            holders = set(holder) if isinstance(holder, list) else {holder}
            body["roles"] = {
                n["name"]: ("active" if n["name"] in holders else "standby") if n["online"] else "offline"
                for n in pcmk.get("nodes", [])
            }
        except ActionError as exc:
            body["pacemaker"] = {"error": exc.message}
            status = 503
        body["local"] = {k: h.get(k) for k in ("health", "reason", "ready", "role", "vips_held", "since")}
        body["peers"] = h.get("peers", {})
        body["history"] = h.get("history", [])
        self._json(status, body)

    def do_GET_metrics(self) -> None:
        self._send(200, self.server.metrics.render(), self.server.metrics.content_type)

    def do_POST_switchover(self) -> None:
        self._authorize()
        body = self._body()
        extra = set(body) - {"to"}
        if extra:
            raise HttpError(400, f"unknown field(s): {', '.join(sorted(extra))}")
        to = self._node(body.get("to"), "to")
        self._action("switchover", lambda: self.server.actions.switchover(to), to=to)

    def do_POST_maintenance(self) -> None:
        self._authorize()
        body = self._body()
        extra = set(body) - {"node", "on"}
        if extra:
            raise HttpError(400, f"unknown field(s): {', '.join(sorted(extra))}")
        if not isinstance(body.get("on"), bool):
            raise HttpError(400, 'field "on" is required and must be true or false')
        node = self._node(body.get("node"), "node")
        on: bool = body["on"]
        self._action("maintenance", lambda: self.server.actions.maintenance(node, on), node=node, on=on)


def serve(server: ApiServer) -> threading.Thread:
    """Serve in a daemon thread; stop with ``server.shutdown(); server.server_close()``."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="sipha-health-api",
                              daemon=True)
    thread.start()
    return thread


__all__ = ["ApiServer", "HttpError", "mutations_allowed", "read_token", "serve", "tls_context"]
