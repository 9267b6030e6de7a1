"""Preview a built site over HTTP with the standard library (a static host in one command) and, given a model,
answer the unit pages' "try your own text" box.

With a prober (harvest/probe.py), two JSON endpoints:
  GET  /api/probe               {"model": name, "sources": [[source, layer], ...]}: the box appears (model null:
                                a plain preview; the box says how to start one that probes)
  POST /api/probe               {"source", "layer", "unit", "text"} -> {"tokens", "activations", "max_position",
                                "scale"}; with "top": N instead of "unit", the N units of that source and layer
                                that fire most on the text -> {"tokens", "units": [{"unit", "max", "position"}]}
Requests are capped in size and in number at a time; a bad one gets {"error": "..."} with status 400 (413 too
big, 503 busy). Files are served from the site folder only (http.server drops `..` and absolute parts).
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featureatlas.build.output import SiteError

if TYPE_CHECKING:
    from featureatlas.harvest.probe import Prober

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"
MAX_BODY = 64 * 1024      # bytes of a probe request
MAX_AT_ONCE = 1           # probes at a time (they hook the one model); others wait briefly, then get 503
MAX_TOP = 100


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; adds the CSP the pages declare, so a preview behaves like production; answers probes."""

    prober: Prober | None = None
    slots = threading.BoundedSemaphore(MAX_AT_ONCE)

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request drowns the URL; errors still reach the browser

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] == "/api/probe":
            if self.prober is None:  # 200, not 404: a page asking is not an error (and logs none)
                return self._json(200, {"model": None, "sources": []})
            return self._json(200, {"model": self.prober.model_name,
                                    "sources": [[s, layer] for s, layer in sorted(self.prober.sources)]})
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/api/probe":
            return self._json(404, {"error": f"no such endpoint: {self.path[:100]}"})
        if self.prober is None:
            return self._json(404, {"error": "no model: start the server with --store STORE or --model MODEL"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._json(400, {"error": "bad Content-Length"})
        if length > MAX_BODY:
            return self._json(413, {"error": f"request over {MAX_BODY:,} bytes; probe a shorter text"})
        try:
            request = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            return self._json(400, {"error": "the body is not JSON"})
        if not self.slots.acquire(timeout=10):
            return self._json(503, {"error": "busy with other probes; try again in a moment"})
        try:
            return self._json(200, probe(self.prober, request))
        except ValueError as err:  # UsageError and AddressError are ValueErrors with one clear line
            return self._json(400, {"error": str(err)})
        finally:
            self.slots.release()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def probe(prober: Prober, request: Any) -> dict:
    """One probe request (see the module docstring); ValueError with a clear message for a bad one."""
    if not isinstance(request, dict):
        raise ValueError("send a JSON object: {source, layer, unit or top, text}")
    text, source, layer = request.get("text"), request.get("source"), request.get("layer")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text: type some text to probe")
    if not isinstance(source, str) or not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError("source (a string) and layer (a number) are required")
    if (source, layer) not in prober.sources:
        raise ValueError(f"this server's model has no {source} layer {layer}")
    if "top" in request:
        top = request["top"]
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= MAX_TOP:
            raise ValueError(f"top: a number from 1 to {MAX_TOP}")
        ids = prober.token_ids(text)
        units = prober.top(None, source, layer, top, token_ids=ids)
        return {"tokens": prober.display(ids),
                "units": [{"unit": u.unit, "max": u.max_activation if math.isfinite(u.max_activation) else None,
                           "position": u.position} for u in units]}
    unit = request.get("unit")
    if not isinstance(unit, int) or isinstance(unit, bool) or unit < 0:
        raise ValueError("unit: a unit number")
    result = prober.unit(text, f"{source}/{layer}/{unit}")
    return {"tokens": result.tokens, "activations": _finite(result.activations.astype(float).tolist()),
            "max_position": result.max_position, "first_counted": result.first_counted, "scale": result.scale}


class _ServerV6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(site_dir: Path, port: int = 8000, host: str = "127.0.0.1",
                prober: Prober | None = None) -> http.server.ThreadingHTTPServer:
    """A server for site_dir, not yet serving; refuses a folder that is not a built site."""
    site_dir = Path(site_dir)
    if not (site_dir / "index.html").is_file():
        raise SiteError(f"{site_dir}: no index.html here; build a site first with `featureatlas build`")
    handler_class = type("Handler", (_Handler,), {"prober": prober,
                                                  "slots": threading.BoundedSemaphore(MAX_AT_ONCE)})
    handler = functools.partial(handler_class, directory=str(site_dir))
    server_class = _ServerV6 if ":" in host else http.server.ThreadingHTTPServer
    try:
        return server_class((host, port), handler)
    except OSError as err:
        raise SiteError(f"{host}:{port}: cannot listen ({err.strerror}); choose another --port") from None


def serve(site_dir: Path, port: int = 8000, host: str = "127.0.0.1", prober: Prober | None = None) -> None:
    """Serve site_dir until Ctrl-C, printing the URL to open."""
    server = make_server(site_dir, port, host, prober)
    bound_host, bound_port = server.server_address[:2]
    shown_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    probing = f"; unit pages can probe {prober.model_name}" if prober is not None else ""
    print(f"Serving {site_dir} at http://{shown_host}:{bound_port}/{probing} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopped.")
    finally:
        server.server_close()
