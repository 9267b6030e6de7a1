"""Preview a built site over HTTP (a static host in one command) and, given a model, answer the unit pages'
"try your own text" box. Only the site's own pages can use it: other web pages the browser visits, and other
machines, are refused.

With a prober (harvest/probe.py), these JSON endpoints:
  GET  /api/probe               {"model": name, "sources": [[source, layer], ...], "ablate": a store to read
                                contexts from}: the boxes appear (model null: a plain preview; the box says how to
                                start one that probes)
  POST /api/probe               {"source", "layer", "unit", "text"} -> {"tokens", "activations", "max_position",
                                "scale"}; with "top": N instead of "unit", the N units of that source and layer
                                that fire most on the text -> {"tokens", "units": [{"unit", "max", "position"}]}
  POST /api/steer               {"source", "layer", "unit", "text", "strength", "mode" ("add" | "clamp"),
                                "max_new_tokens" (1-64), "seed" (null: greedy)} -> {"unsteered", "steered", ...}:
                                the text continued as the model does and with the unit pushed (harvest/steer.py)
  POST /api/ablate              {"source", "layer", "unit", "context_id", "position"} -> {"effects": [...]}: the
                                change in log p of each token after the position of a stored context when the unit
                                is removed there (harvest/ablation.py; needs --store: "ablate" true in GET /api/probe)
A bad request gets {"error": "..."} (400; 413 too big, 503 busy).

What is refused, and why (a page on any site can make the browser send requests here):
- a Host header other than a loopback name with the bound port: 421 (DNS rebinding: a foreign name resolving to
  127.0.0.1 would otherwise let that site read every answer);
- /api/* from another site (Sec-Fetch-Site cross-site or same-site, or an Origin that is not this server's): 403;
  a POST that is not Content-Type: application/json: 415 (a form or text/plain POST needs no CORS preflight);
- a POST body with a chunked, negative, non-numeric, repeated or missing length: 400; over MAX_BODY: 413, both
  before reading any of it;
- a connection silent for `timeout` seconds is dropped; past `max_connections` open ones, a new one gets 503 and
  is closed without a thread;
- directories without index.html, names starting with "." and paths that leave the site (also through symlinks):
  404.
Every response carries a CSP with frame-ancestors 'none', Cross-Origin-Resource-Policy: same-origin (other sites
cannot load the shards with <script src>) and X-Content-Type-Options: nosniff.

It stays on the standard library's http.server: the site is static files plus a few JSON endpoints, the checks above
are a few dozen lines kept in one place and tested over real sockets, and a server library would add a dependency
(and its own defaults to review) to every install for a local preview.
"""

from __future__ import annotations

import email.utils
import functools
import http.server
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featureatlas.errors import SiteError, UsageError, setting_name
from featureatlas.net import is_loopback

if TYPE_CHECKING:
    from featureatlas.harvest.probe import Prober

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"
HEADER_CSP = CSP + "; frame-ancestors 'none'"  # frame-ancestors works only as a header, not in the pages' <meta>
SECURITY_HEADERS = (("Content-Security-Policy", HEADER_CSP), ("Cross-Origin-Resource-Policy", "same-origin"),
                    ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"))
MAX_BODY = 64 * 1024      # bytes of a probe request
MAX_AT_ONCE = 1           # probes at a time (they hook the one model); others wait briefly, then get 503
MAX_TOP = 100
MAX_NEW_TOKENS = 64       # tokens a steering request continues its text by, each way
MAX_STRENGTH = 10_000.0   # |strength| (or clamp value) of a steering request, in the unit's activation units
MAX_STEER_CHARS = 2_000   # a steering request's text: a prompt, not a document
TIMEOUT = 20.0            # seconds a connection may stay silent, sending its request or taking the answer
MAX_CONNECTIONS = 48      # open connections (a thread each); more are turned away at once
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
_LENGTH = re.compile(r"[0-9]{1,15}")


def _busy_answer() -> bytes:
    body = b"busy: too many open connections; try again in a moment\n"
    head = ["HTTP/1.0 503 Service Unavailable", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in SECURITY_HEADERS)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY_ANSWER = _busy_answer()


def _host_and_port(value: str) -> tuple[str, int] | None:
    """("name", port) of a Host header or an origin's authority ("[::1]:8000", "localhost"); port 80 when absent;
    None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name or (rest and not (rest[0] == ":" and _LENGTH.fullmatch(rest[1:]) and len(rest) <= 6)):
        return None
    return name, int(rest[1:]) if rest else 80


class _Hosts:
    """The Host names this server answers to: loopback names, the bound address, and with --allow-remote on a
    wildcard address (0.0.0.0, ::) any IP address and this machine's names. IP literals cannot be rebound, so
    only names are the DNS rebinding risk."""

    def __init__(self, host: str, port: int, bound: str) -> None:
        self.port = port
        self.names = set(LOOPBACK_NAMES) | {host.lower().strip("[]"), bound.lower()}
        self.any_ip = host in ("", "0.0.0.0", "::")
        if self.any_ip:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def accepts(self, value: str) -> bool:
        parsed = _host_and_port(value)
        if parsed is None or parsed[1] != self.port:
            return False
        if parsed[0] in self.names:
            return True
        if not self.any_ip:
            return False
        try:
            ipaddress.ip_address(parsed[0])
        except ValueError:
            return False
        return True


def _path_words(url_path: str) -> list[str] | None:
    """The folder and file names of a URL path; None when one is hidden (a leading "."; also "." and "..") or
    holds a backslash or NUL, or the path is not UTF-8."""
    try:
        text = urllib.parse.unquote(url_path, errors="strict")
    except UnicodeDecodeError:
        return None
    words = [w for w in text.split("/") if w]
    if any(w.startswith(".") or "\\" in w or "\0" in w for w in words):
        return None
    return words


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site's files and the probe endpoints, refusing what the module docstring lists."""

    prober: Prober | None = None
    slots = threading.BoundedSemaphore(MAX_AT_ONCE)
    hosts: _Hosts
    site_root = ""
    timeout = TIMEOUT  # socketserver.StreamRequestHandler sets it on the connection

    def version_string(self) -> str:
        return "featureatlas"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if self.request_version == "HTTP/0.9":  # a 0.9 answer has no headers, so none of the protective ones
            self.request_version = "HTTP/1.0"
        super().send_error(code, message, explain)

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request drowns the URL; errors still reach the browser

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # no browser sends it, and its answers cannot carry headers
            return self._refuse(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not served")
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            return self._refuse(HTTPStatus.BAD_REQUEST, "send one Host header")
        if not self.hosts.accepts(hosts[0]):
            return self._refuse(HTTPStatus.MISDIRECTED_REQUEST,
                                "this server answers only to its own address; open the one `featureatlas serve` "
                                f"printed (on this machine: http://127.0.0.1:{self.hosts.port}/)")
        return True

    def _refuse(self, status: HTTPStatus, message: str) -> bool:
        self.close_connection = True
        if self.path.startswith("/api/"):
            self._json(status, {"error": message})
        else:
            self.send_error(status, explain=message)
        return False

    def _cross_site(self) -> str | None:
        """Why an /api/ request comes from another site's page, or None: browsers mark such requests with
        Sec-Fetch-Site and, on a POST, with an Origin other than this server's."""
        if self.headers.get("Sec-Fetch-Site", "").strip().lower() in ("cross-site", "same-site"):
            return "requests from other sites are refused; open the page from this server"
        origins = self.headers.get_all("Origin") or []
        if not origins:
            return None
        origin = origins[-1] if len(origins) == 1 else ""
        own = _host_and_port(self.headers["Host"])
        if not origin.lower().startswith("http://") or _host_and_port(origin[len("http://"):]) != own:
            return "requests from other origins are refused; open the page from this server"
        return None

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/api/"):
            if (why := self._cross_site()) is not None:
                return self._json(403, {"error": why})
            if self.path.split("?")[0] != "/api/probe":
                return self._json(404, {"error": "no such endpoint"})
            if self.prober is None:  # 200, not 404: a page asking is not an error (and logs none)
                return self._json(200, {"model": None, "sources": [], "ablate": False})
            return self._json(200, {"model": self.prober.model_name,
                                    "sources": [[s, layer] for s, layer in sorted(self.prober.sources)],
                                    "ablate": self.prober.store is not None})
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self.close_connection = True  # the body may be left unread below
        answer = ENDPOINTS.get(self.path.split("?")[0])
        if answer is None:
            return self._json(404, {"error": "no such endpoint"})
        if (why := self._cross_site()) is not None:
            return self._json(403, {"error": why})
        if self.headers.get_content_type() != "application/json":
            return self._json(415, {"error": "send the request as Content-Type: application/json"})
        body = self._body()
        if body is None:
            return None
        if self.prober is None:
            return self._json(404, {"error": "no model: start the server with --store STORE or --model MODEL"})
        try:
            request = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            return self._json(400, {"error": "the body is not JSON"})
        if not self.slots.acquire(timeout=10):
            return self._json(503, {"error": "busy with other probes; try again in a moment"})
        try:
            return self._json(200, answer(self.prober, request))
        except ValueError as err:  # UsageError and AddressError are ValueErrors with one clear line
            return self._json(400, {"error": str(err)})
        finally:
            self.slots.release()

    def _body(self) -> bytes | None:
        """The request body, read only once its declared length is valid and within MAX_BODY; else None after
        answering 400 or 413."""
        if "Transfer-Encoding" in self.headers:
            self._json(400, {"error": "Transfer-Encoding is not accepted; send the body with a Content-Length"})
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) != 1 or not _LENGTH.fullmatch(lengths[0].strip()):
            self._json(400, {"error": "bad Content-Length: send one, a number of bytes"})
            return None
        length = int(lengths[0])
        if length > MAX_BODY:
            self._json(413, {"error": f"request over {MAX_BODY:,} bytes; probe a shorter text"})
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self._json(400, {"error": "the body ended before its Content-Length"})
            return None
        return body

    def send_head(self) -> Any:
        """A file of the site, or the index.html of one of its folders (redirected to end in "/"); 404 for
        anything else, without a directory listing."""
        url_path = urllib.parse.urlsplit(self.path).path
        words = _path_words(url_path)
        path = None if words is None else self._inside(os.path.join(self.site_root, *words))
        if path is not None and os.path.isdir(path):
            if not url_path.endswith("/"):
                self.send_response(HTTPStatus.MOVED_PERMANENTLY)
                self.send_header("Location", url_path + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            path = self._inside(os.path.join(path, "index.html"))
        if path is None or not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        try:
            f = open(path, "rb")  # noqa: SIM115 - http.server's copyfile reads and closes it
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        stat = os.fstat(f.fileno())
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        self.end_headers()
        return f

    def _inside(self, path: str) -> str | None:
        """path with symlinks resolved, if it stays in the site and names nothing hidden there; else None."""
        real = os.path.realpath(path)
        if real != self.site_root and not real.startswith(self.site_root + os.sep):
            return None
        if any(part.startswith(".") for part in Path(real).relative_to(self.site_root).parts):
            return None
        return real

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "File not found")  # never a listing

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unit_of(prober: Prober, request: Any, fields: str) -> str:
    """The address of a request's source, layer and unit, each checked against the prober's."""
    if not isinstance(request, dict):
        raise ValueError(f"send a JSON object: {{{fields}}}")
    source, layer, unit = request.get("source"), request.get("layer"), request.get("unit")
    if not isinstance(source, str) or not _is_int(layer):
        raise ValueError("source (a string) and layer (a number) are required")
    if (source, layer) not in prober.sources:
        raise ValueError(f"this server's model has no {source} layer {layer}")
    if not _is_int(unit) or unit < 0:
        raise ValueError("unit: a unit number")
    return f"{source}/{layer}/{unit}"


def steer(prober: Prober, request: Any) -> dict:
    """One steering request (see the module docstring): every field checked before the model runs."""
    address = _unit_of(prober, request, "source, layer, unit, text, strength, mode, max_new_tokens, seed")
    text, strength = request.get("text"), request.get("strength")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text: type a prompt to continue")
    if len(text) > MAX_STEER_CHARS:
        raise ValueError(f"text: {len(text):,} characters; steering takes a prompt of at most {MAX_STEER_CHARS:,}")
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength) \
            or abs(strength) > MAX_STRENGTH:
        raise ValueError(f"strength: a number from -{MAX_STRENGTH:,.0f} to {MAX_STRENGTH:,.0f}")
    mode, new, seed = request.get("mode", "add"), request.get("max_new_tokens", 30), request.get("seed")
    if mode not in ("add", "clamp"):
        raise ValueError('mode: "add" or "clamp"')
    if not _is_int(new) or not 1 <= new <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens: a number from 1 to {MAX_NEW_TOKENS}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise ValueError("seed: null (greedy decoding) or a number from 0 to 4294967295")
    result = prober.steer(text, address, float(strength), mode, new, seed)
    return {"prompt": result.prompt, "unsteered": result.unsteered, "steered": result.steered, "mode": result.mode,
            "strength": result.value, "max_new_tokens": new, "seed": seed}


def ablate(prober: Prober, request: Any) -> dict:
    """One ablation request (see the module docstring): a stored context, rebuilt from the store by its id."""
    address = _unit_of(prober, request, "source, layer, unit, context_id, position")
    context_id, position = request.get("context_id"), request.get("position")
    if not _is_int(context_id) or not 0 <= context_id < 2**63:
        raise ValueError("context_id: the number of a stored context")
    if not _is_int(position) or position < 0:
        raise ValueError("position: a token position in the context")
    ids = prober.context_token_ids(context_id)
    if position >= len(ids):
        raise ValueError(f"position {position}: context {context_id} has positions 0-{len(ids) - 1}")
    result = prober.ablate(address, ids, position)
    return {"context_id": context_id, "position": position,
            "effects": _finite(result.effects.astype(float).tolist())}


# POST endpoints: path -> the function that answers a request (a parsed JSON value) with a JSON object, raising
# ValueError with one clear line for a bad one. Every endpoint passes the same checks first (see the docstring).
ENDPOINTS: dict[str, Any] = {"/api/probe": probe, "/api/steer": steer, "/api/ablate": ablate}


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most max_connections at once: past that, a new connection is answered 503
    and closed by the accepting thread, so a flood of idle sockets costs no threads."""

    request_queue_size = 128  # a burst of connects waits in the backlog instead of timing out in SYN retries

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        self.open_connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.open_connections.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(BUSY_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.open_connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open_connections.release()


class _ServerV6(Server):
    address_family = socket.AF_INET6


def make_server(site_dir: Path, port: int = 8000, host: str = "127.0.0.1", prober: Prober | None = None, *,
                allow_remote: bool = False, timeout: float = TIMEOUT,
                max_connections: int = MAX_CONNECTIONS) -> Server:
    """A server for site_dir, not yet serving; refuses a folder that is not a built site, and a host other
    machines can reach unless allow_remote (`serve --allow-remote`)."""
    site_dir = Path(site_dir)
    if not (site_dir / "index.html").is_file():
        raise SiteError(f"{site_dir}: no index.html here; build a site first with `featureatlas build`")
    if not is_loopback(host) and not allow_remote:
        raise UsageError(f"{setting_name('host')} {host or repr(host)}: not a loopback address, so other machines "
                         f"could read the site and run the model; use {setting_name('host')} 127.0.0.1, or add "
                         f"{setting_name('allow_remote')} to serve it anyway")
    root = os.path.realpath(site_dir)
    handler_class = type("Handler", (_Handler,), {"prober": prober, "site_root": root, "timeout": timeout,
                                                  "slots": threading.BoundedSemaphore(MAX_AT_ONCE)})
    server_class = _ServerV6 if ":" in host else Server
    try:
        server = server_class((host, port), functools.partial(handler_class, directory=root), max_connections)
    except OSError as err:
        raise SiteError(f"{host}:{port}: cannot listen ({err.strerror}); choose another {setting_name('port')}"
                        ) from None
    handler_class.hosts = _Hosts(host, server.server_address[1], str(server.server_address[0]))
    return server


def serve(site_dir: Path, port: int = 8000, host: str = "127.0.0.1", prober: Prober | None = None, *,
          allow_remote: bool = False) -> None:
    """Serve site_dir until Ctrl-C, printing the URL to open (and a warning on stderr when other machines can
    reach it)."""
    server = make_server(site_dir, port, host, prober, allow_remote=allow_remote)
    bound_host, bound_port = server.server_address[:2]
    shown_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    if not is_loopback(host):
        print(f"warning: serving on {host or 'every address'}, port {bound_port}: anyone who can reach this machine "
              "can read the site" + (" and run the model" if prober is not None else "") + " (plain HTTP, no login)",
              file=sys.stderr, flush=True)
    probing = f"; unit pages can probe {prober.model_name}" if prober is not None else ""
    print(f"Serving {site_dir} at http://{shown_host}:{bound_port}/{probing} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopped.")
    finally:
        server.server_close()
