"""Attacks on a running `featureatlas serve`, performed over real sockets against a real server (a tiny real
model behind the probe endpoint): another site's page posting to the API, DNS rebinding (a foreign Host),
hostile Content-Length and Transfer-Encoding, a flood of idle connections, and paths out of the site through
`..`, dotfiles and symlinks. Each must be refused, and every response must carry the headers that keep other
sites from framing or embedding what it serves."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featureatlas.cli import main
from featureatlas.errors import UsageError
from featureatlas.harvest.probe import load_prober
from featureatlas.serve.server import (
    CSP,
    LOOPBACK_NAMES,
    MAX_BODY,
    Server,
    _host_and_port,
    _Hosts,
    make_server,
)

from helpers.tiny_models import save_tiny_model

SECRET = "top-secret-outside-the-site"
PROBE = {"text": "The quick brown fox", "source": "mlp", "layer": 0, "unit": 3}

Header = tuple[str, str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder holding what an attacker would reach for: dotfiles, a folder without index.html, symlinks
    out of the site (to a folder and a file), one to a dotfile inside, and one that stays inside (served)."""
    root = tmp_path_factory.mktemp("security-serve")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    site = root / "site"
    (site / "static").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>atlas</title>home page")
    (site / "static" / "site.js").write_text("var served = 1;")
    (site / "sub").mkdir()
    (site / "sub" / "index.html").write_text("sub page")
    (site / "listing").mkdir()
    (site / "listing" / "unlisted-name.txt").write_text("a file")
    (site / ".env").write_text(SECRET)
    (site / ".hidden").mkdir()
    (site / ".hidden" / "secret.txt").write_text(SECRET)
    (site / "out").symlink_to(outside, target_is_directory=True)
    (site / "out-file.txt").symlink_to(outside / "secret.txt")
    (site / "sub" / "dot.txt").symlink_to(site / ".env")
    (site / "inside.js").symlink_to(site / "static" / "site.js")
    return site


@pytest.fixture(scope="module")
def port(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    model = save_tiny_model("gpt2", tmp_path_factory.mktemp("model") / "gpt2")
    server = make_server(site, port=0, prober=load_prober(str(model), device="cpu", dtype="float32"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def exchange(port: int, raw: bytes, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes after each one), parse it. The client keeps its
    side open, so an answer that needs the client to finish or close first shows up as a timeout here."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(lines[0].split()[1])
    assert_protective_headers(status, headers)
    return status, headers, body


def assert_protective_headers(status: int, headers: dict[str, str]) -> None:
    assert headers.get("cross-origin-resource-policy") == "same-origin", status
    assert headers.get("x-content-type-options") == "nosniff", status
    csp = headers.get("content-security-policy", "")
    assert csp.startswith(CSP + ";") and "frame-ancestors 'none'" in csp, status


def request(port: int, method: str, path: str, headers: list[Header] | None = None, body: bytes = b"",
            host: str | None = "own") -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 request with exactly these headers (Host is the server's own unless given; None: none)."""
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {f'127.0.0.1:{port}' if host == 'own' else host}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def post(port: int, body: dict | bytes, headers: list[Header], host: str | None = "own") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = request(port, "POST", "/api/probe", [*headers, ("Content-Length", str(len(data)))], data,
                                host)
    return status, json.loads(answer) if answer.startswith(b"{") else {"error": answer.decode("latin-1")}


def same_origin(port: int, name: str = "127.0.0.1") -> list[Header]:
    """What a browser sends with the site's own probe box."""
    return [("Origin", f"http://{name}:{port}"), ("Sec-Fetch-Site", "same-origin"),
            ("Content-Type", "application/json")]


def one_line_error(answer: dict) -> bool:
    return isinstance(answer.get("error"), str) and answer["error"] != "" and "\n" not in answer["error"]


# --- the site's own pages still work --------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_the_sites_own_probe_box_is_answered(port: int, name: str) -> None:
    status, answer = post(port, PROBE, same_origin(port, name), host=f"{name}:{port}")
    assert status == 200 and len(answer["activations"]) == len(answer["tokens"]) > 3
    status, answer = post(port, PROBE, [("Content-Type", "application/json; charset=utf-8")])  # curl, a script
    assert status == 200 and answer["tokens"]
    status, _, body = request(port, "GET", "/api/probe", [("Sec-Fetch-Site", "same-origin")])
    assert status == 200 and ["mlp", 0] in json.loads(body)["sources"]


# --- another site's page, and DNS rebinding -------------------------------------------------------------

@pytest.mark.model
def test_the_reported_cross_site_text_plain_post_is_refused(port: int) -> None:
    """The issue's attack verbatim: a CORS-simple POST from another site, through a rebound name."""
    status, answer = post(port, PROBE, [("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site"),
                                        ("Content-Type", "text/plain")], host="evil.example:8765")
    assert status == 421 and one_line_error(answer) and "activations" not in answer


@pytest.mark.model
@pytest.mark.parametrize("headers", [
    [("Sec-Fetch-Site", "cross-site")],
    [("Sec-Fetch-Site", "same-site")],
    [("Origin", "http://evil.example")],
    [("Origin", "null")],
    [("Origin", "http://127.0.0.1:1")],
    [("Origin", "https://127.0.0.1:{port}")],
    [("Origin", "http://127.0.0.1:{port}.evil.example")],
    [("Origin", "http://localhost:{port}")],  # a page of localhost:PORT is another origin than 127.0.0.1:PORT
    [("Origin", "http://127.0.0.1:{port}"), ("Sec-Fetch-Site", "cross-site")],
    [("Origin", "http://127.0.0.1:{port}"), ("Origin", "http://evil.example")],
], ids=lambda h: " ".join(f"{k}={v}" for k, v in h))
def test_cross_site_api_calls_get_403(port: int, headers: list[Header]) -> None:
    headers = [(k, v.format(port=port)) for k, v in headers]
    status, answer = post(port, PROBE, [*headers, ("Content-Type", "application/json")])
    assert status == 403 and one_line_error(answer)
    status, _, body = request(port, "GET", "/api/probe", headers)
    assert status == 403 and one_line_error(json.loads(body))


@pytest.mark.model
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp", "text/json"])
def test_a_probe_post_must_be_json(port: int, content_type: str | None) -> None:
    """Forms and text/plain are what another page can send without a CORS preflight."""
    headers = [h for h in same_origin(port) if h[0] != "Content-Type"]
    status, answer = post(port, PROBE, headers + ([("Content-Type", content_type)] if content_type else []))
    assert status == 415 and "application/json" in answer["error"] and one_line_error(answer)


@pytest.mark.model
@pytest.mark.parametrize("host", [
    "evil.example:{port}", "evil.example", "127.0.0.1", "127.0.0.1:1", "localhost.evil.example:{port}",
    "127.0.0.1.nip.io:{port}", "[::1]", "[::1", "::1:{port}", "127.0.0.1:{port}:{port}", "127.0.0.1:+{port}",
    "0x7f000001:{port}", "2130706433:{port}", "127.1:{port}", "",
])
def test_a_foreign_host_header_gets_421(port: int, host: str) -> None:
    """DNS rebinding: another site's name resolving to 127.0.0.1 makes its pages same-origin with this server;
    the Host header still names that site, and nothing is answered to it."""
    host = host.format(port=port)
    name = host.rpartition(":")[0] if host.count(":") == 1 else host
    for method, path in (("GET", "/"), ("GET", "/index.html"), ("GET", "/api/probe"), ("HEAD", "/")):
        status, _, body = request(port, method, path, [("Origin", f"http://{name}:{port}"),
                                                       ("Sec-Fetch-Site", "same-origin")], host=host)
        assert status == 421 and b"home page" not in body and b"sources" not in body, (method, path)
    status, answer = post(port, PROBE, same_origin(port, name), host=host)
    assert status == 421 and one_line_error(answer)


@pytest.mark.model
def test_host_must_be_one_loopback_name(port: int) -> None:
    assert request(port, "GET", "/", host=None)[0] == 400
    assert request(port, "GET", "/", [("Host", f"evil.example:{port}")])[0] == 400  # two Host headers
    for host in (f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        status, _, body = request(port, "GET", "/", host=host)
        assert status == 200 and b"home page" in body, host


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"\[?[0-9a-z.:\[\]]{0,20}(:[0-9+\- ]{0,7})?", fullmatch=True))
def test_only_loopback_names_with_the_port_are_accepted(value: str) -> None:
    hosts = _Hosts("127.0.0.1", 8000, "127.0.0.1")
    parsed = _host_and_port(value)
    if hosts.accepts(value):
        assert parsed is not None and parsed[0] in LOOPBACK_NAMES and parsed[1] == 8000


# --- request lengths ------------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.parametrize("length_headers", [
    [("Content-Length", "-1")],
    [("Content-Length", "abc")],
    [("Content-Length", "+5")],
    [("Content-Length", "1e3")],
    [("Content-Length", "0x10")],
    [("Content-Length", "5_0")],
    [("Content-Length", "")],
    [("Content-Length", "9" * 20)],
    [("Content-Length", "5"), ("Content-Length", "500")],
    [("Transfer-Encoding", "chunked")],
    [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
    [],
], ids=lambda h: " ".join(f"{k}={v}" for k, v in h) or "none")
def test_a_bad_length_gets_400_before_any_body(port: int, length_headers: list[Header]) -> None:
    """No body is sent and the client stays connected: the answer must not wait for one (the negative length
    used to be read to EOF, holding the connection and its thread forever)."""
    status, _, body = request(port, "POST", "/api/probe", same_origin(port) + length_headers)
    assert status == 400 and one_line_error(json.loads(body))


@pytest.mark.model
def test_a_chunked_body_is_refused(port: int) -> None:
    chunked = json.dumps(PROBE).encode()
    body = f"{len(chunked):x}\r\n".encode() + chunked + b"\r\n0\r\n\r\n"
    status, _, answer = request(port, "POST", "/api/probe", same_origin(port) + [("Transfer-Encoding", "chunked")],
                                body)
    assert status == 400 and "Content-Length" in json.loads(answer)["error"]


@pytest.mark.model
@pytest.mark.parametrize("length", [MAX_BODY + 1, 10**9, 10**14])
def test_an_oversize_length_gets_413_without_reading(port: int, length: int) -> None:
    status, _, body = request(port, "POST", "/api/probe", same_origin(port) + [("Content-Length", str(length))])
    assert status == 413 and "shorter" in json.loads(body)["error"]


@pytest.mark.model
def test_a_body_shorter_than_its_length_gets_400(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        head = ["POST /api/probe HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
                "Content-Length: 100"]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"text": "x"}')
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400") and b"ended before" in answer


# --- connections ----------------------------------------------------------------------------------------

def test_an_idle_connection_flood_is_bounded_and_the_server_recovers(site: Path) -> None:
    """200 sockets that connect and say nothing: past the cap they are answered 503 and closed without a thread;
    those within it are dropped after the timeout; a normal request is then answered while the flood stays
    connected."""
    cap, flood = 8, 200
    server = make_server(site, port=0, timeout=1.5, max_connections=cap)
    assert isinstance(server, Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    before = threading.active_count()
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(flood)]
    try:
        answers = {sock: b"" for sock in sockets}
        turned_away: set[socket.socket] = set()
        peak = 0
        dropped: set[socket.socket] = set()
        while len(turned_away) + len(dropped) < flood:
            peak = max(peak, threading.active_count() - before)
            readable, _, _ = select.select([s for s in sockets if s not in turned_away | dropped], [], [], 15)
            assert readable, "no connection was answered or dropped"
            for sock in readable:
                chunk = sock.recv(65536)
                answers[sock] += chunk
                if not chunk:
                    (turned_away if answers[sock] else dropped).add(sock)
        assert peak <= cap
        assert len(turned_away) >= flood - 4 * cap and all(answers[s].startswith(b"HTTP/1.0 503") for s in turned_away)
        assert dropped and all(answers[s] == b"" for s in dropped)  # idle within the cap: closed at the timeout
        status, headers, _ = exchange(port, f"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert status == 200
        head = answers[next(iter(turned_away))].partition(b"\r\n\r\n")[0].decode().split("\r\n")
        assert_protective_headers(503, {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])})
    finally:
        for sock in sockets:
            sock.close()
        server.shutdown()
        server.server_close()


# --- paths ----------------------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.parametrize("path", [
    "/.env", "/%2eenv", "/.hidden/secret.txt", "/.hidden/", "/static/../.env", "/sub/dot.txt",
    "/out/secret.txt", "/out/", "/out-file.txt", "/%6fut/secret.txt", "/../outside/secret.txt",
    "/%2e%2e/outside/secret.txt", "/static/..%2f..%2foutside%2fsecret.txt", "/sub/%2e%2e/%2e%2e/outside/secret.txt",
    "/listing/", "/..%5coutside%5csecret.txt", "/%ff", "/index.html%00.js",
])
def test_nothing_hidden_listed_or_outside_is_served(port: int, path: str) -> None:
    for method in ("GET", "HEAD"):
        status, _, body = request(port, method, path)
        assert status == 404 and SECRET.encode() not in body and b"unlisted-name" not in body, (method, path)


@pytest.mark.model
def test_the_sites_files_and_folders_are_served(port: int) -> None:
    assert request(port, "GET", "/")[2].endswith(b"home page")
    assert request(port, "GET", "/sub/")[2] == b"sub page"
    status, headers, _ = request(port, "GET", "/sub?x=1")
    assert status == 301 and headers["location"] == "/sub/"
    status, headers, body = request(port, "GET", "/inside.js")  # a symlink that stays in the site
    assert status == 200 and body == b"var served = 1;" and "javascript" in headers["content-type"]
    status, headers, body = request(port, "HEAD", "/static/site.js")
    assert status == 200 and body == b"" and headers["content-length"] == "15"


@pytest.mark.model
def test_other_methods_and_garbage_still_carry_the_headers(port: int) -> None:
    """exchange() checks the protective headers on each of these answers."""
    for method in ("PUT", "DELETE", "OPTIONS"):
        assert request(port, method, "/api/probe")[0] == 501
    assert exchange(port, b"GET / extra HTTP/1.1\r\n\r\n")[0] == 400
    assert exchange(port, b"GET / HTTP/9.9\r\n\r\n")[0] == 505
    status, _, body = exchange(port, f"GET /\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())  # 0.9: no headers
    assert status == 400 and b"home page" not in body
    assert request(port, "POST", "/index.html", same_origin(port) + [("Content-Length", "0")])[0] == 404


# --- binding --------------------------------------------------------------------------------------------

def test_a_reachable_host_needs_allow_remote(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="use host 127.0.0.1, or add allow_remote"):  # the library's settings
        make_server(site, port=0, host="0.0.0.0")
    assert main(["serve", str(site), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err  # the command line's flags
    assert "use --host 127.0.0.1, or add --allow-remote" in err and err.count("\n") == 1
    server = make_server(site, port=0, host="0.0.0.0", allow_remote=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:  # IP literals cannot be rebound; other names still can, and are refused
        assert request(port, "GET", "/", host=f"192.0.2.7:{port}")[0] == 200
        assert request(port, "GET", "/", host=f"evil.example:{port}")[0] == 421
    finally:
        server.shutdown()
        server.server_close()


def test_allow_remote_prints_a_warning(site: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def stop_at_once(self: Server, poll_interval: float = 0.5) -> None:
        raise KeyboardInterrupt  # Ctrl-C as soon as it would start answering

    monkeypatch.setattr(Server, "serve_forever", stop_at_once)
    assert main(["serve", str(site), "--host", "0.0.0.0", "--port", "0", "--allow-remote"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: ") and "anyone who can reach this machine" in err and err.count("\n") == 1
    assert out.startswith("Serving ")
    assert main(["serve", str(site), "--port", "0"]) == 0
    assert capsys.readouterr().err == ""
