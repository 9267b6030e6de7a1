"""Preview a built site over HTTP with the standard library (a static host in one command)."""

from __future__ import annotations

import functools
import http.server
import socket
from pathlib import Path

from featureatlas.build.output import SiteError


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files only; adds the same CSP the pages declare, so a preview behaves like production."""

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request drowns the URL; errors still reach the browser


class _ServerV6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(site_dir: Path, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """A server for site_dir, not yet serving; refuses a folder that is not a built site."""
    site_dir = Path(site_dir)
    if not (site_dir / "index.html").is_file():
        raise SiteError(f"{site_dir}: no index.html here; build a site first with `featureatlas build`")
    handler = functools.partial(_Handler, directory=str(site_dir))
    server_class = _ServerV6 if ":" in host else http.server.ThreadingHTTPServer
    try:
        return server_class((host, port), handler)
    except OSError as err:
        raise SiteError(f"{host}:{port}: cannot listen ({err.strerror}); choose another --port") from None


def serve(site_dir: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve site_dir until Ctrl-C, printing the URL to open."""
    server = make_server(site_dir, port, host)
    bound_host, bound_port = server.server_address[:2]
    shown_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    print(f"Serving {site_dir} at http://{shown_host}:{bound_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopped.")
    finally:
        server.server_close()
