"""Egress as a capability (kernel/doors/egress.py, issue 18.4): a sandboxed agent reaches a
host only through the kernel's proxy, only where it holds net.connect@HOST:PORT; everything
else is a 403 its HTTP client shows and an audit line. Servers in this test process stand for
the outside hosts: the agent's own loopback is not the host's, so they are reached only through
the proxy, granted by IP. They listen on 127.0.0.2 where a client honouring the environment is
used: NO_PROXY names 127.0.0.1 (the agent's door) and would keep 127.0.0.1 off the proxy."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import socketserver
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import TEST_TIER, KernelProcess, agent, wait_until

pytestmark = pytest.mark.skipif(TEST_TIER not in ("strict", "standard"),
                                reason="the proxy is relayed into an agent's network namespace")

OUTSIDE = "127.0.0.2"
BODY = "hello from outside\n" * 300  # ~5.7 kB: more than the metered group's bytes budget


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = (BODY + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _tls(server: http.server.ThreadingHTTPServer, tmp: Path) -> str:
    """Serve TLS with a fresh self-signed certificate for OUTSIDE; its PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outside")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(OUTSIDE))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (tmp / "cert.pem").write_text(pem)
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return pem


class World:
    """The kernel and the outside hosts."""

    def __init__(self, tmp: Path) -> None:
        config = tmp / "kernel.toml"
        config.write_text("[groups.metered]\nbudgets = {bytes = 4000}\n")
        self.k = KernelProcess(tmp / "state")
        self.k.extra_args = ["--config", str(config)]
        self.http = http.server.ThreadingHTTPServer((OUTSIDE, 0), _Page)
        self.https = http.server.ThreadingHTTPServer((OUTSIDE, 0), _Page)
        self.pem = _tls(self.https, tmp)
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        self.echo.daemon_threads = True
        for server in (self.http, self.https, self.echo):
            _serve(server)
        self.hp, self.sp = self.http.server_address[1], self.https.server_address[1]
        self.ep = self.echo.server_address[1]

    def run(self, caps: list[str], steps: list[dict], name: str,
            group: str | None = None) -> tuple[int, list[dict]]:
        with self.k.connect() as admin:
            agent_id = admin.proc.spawn(agent("netclient"), name=name, caps=caps,
                                        argv=[json.dumps(steps)], group=group)
            info = admin.proc.wait(agent_id, timeout=60)
        return agent_id, self.outcomes(agent_id, info)

    def outcomes(self, agent_id: int, info: object = None) -> list[dict]:
        with self.k.connect() as admin:
            out = admin.proc.logs(agent_id, "stdout").data.decode()
            err = admin.proc.logs(agent_id, "stderr").data.decode()
        assert info is None or getattr(info, "exit_status", 0) == 0, err
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def audit(self, agent_id: int, event: str) -> list[sdk.abi.AuditRecord]:
        with self.k.connect() as admin:
            return [r for r in admin.audit.read(limit=10000) if r.event == event
                    and r.principal == f"agent:{agent_id}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("egress"))
    w.k.start()
    yield w
    assert w.k.stop() == 0
    for server in (w.http, w.https, w.echo):
        server.shutdown()
        server.server_close()


def test_a_granted_host_is_reached_over_plain_http_and_connect(world: World) -> None:
    http_url = f"http://{OUTSIDE}:{world.hp}/plain"
    https_url = f"https://{OUTSIDE}:{world.sp}/tls"
    agent_id, out = world.run(
        [f"net.connect@{OUTSIDE}:{world.hp}", f"net.connect@{OUTSIDE}:{world.sp}"],
        [{"env": 1}, {"get": http_url}, {"get": https_url, "ca": world.pem},
         {"get": https_url + "2", "ca": world.pem, "client": "httpx"}], name="fetcher")
    env, plain, tls, via_httpx = (next(iter(o.values())) for o in out)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        assert env[name] == "http://127.0.0.1:3128"
    assert plain == {"status": 200, "body": BODY + "/plain"}
    assert tls == {"status": 200, "body": BODY + "/tls"}
    assert via_httpx == {"status": 200, "body": BODY + "/tls2"}
    opened = world.audit(agent_id, "egress")
    assert {r.detail["method"] for r in opened} == {"GET", "CONNECT"}
    assert wait_until(lambda: len(world.audit(agent_id, "egress-end")) == 3)
    ends = world.audit(agent_id, "egress-end")
    assert all(r.detail["down"] > len(BODY) for r in ends), ends


def test_what_is_not_granted_is_403_naming_the_capability_and_audited(world: World) -> None:
    agent_id, out = world.run(
        [f"net.connect@{OUTSIDE}:{world.hp}"],
        [{"get": f"http://{OUTSIDE}:{world.sp}/"},
         {"get": f"https://{OUTSIDE}:{world.sp}/", "ca": world.pem},
         {"raw": f"GET http://{OUTSIDE}:443/ HTTP/1.1\r\nHost: x\r\n\r\n"},
         {"raw": "CONNECT 0x7f.1:80 HTTP/1.1\r\n\r\n"},
         {"get": f"http://{OUTSIDE}:{world.hp}/still"}], name="refused")
    plain, tls, connect_only, disguised, granted = (next(iter(o.values())) for o in out)
    need = f"net.connect@{OUTSIDE}:{world.sp}"
    assert plain["status"] == 403 and need in plain["body"], plain
    assert "403" in tls["message"] and f"needs {need}" in tls["message"], tls
    assert connect_only["line"].startswith("HTTP/1.1 403") and "CONNECT only" in \
        connect_only["body"]
    assert disguised["line"].startswith("HTTP/1.1 400"), disguised
    assert granted["status"] == 200
    denials = world.audit(agent_id, "deny")
    targets = {r.detail.get("resource") for r in denials if r.detail.get("call") == "net.connect"}
    assert f"net/{OUTSIDE}:{world.sp}" in targets and f"net/{OUTSIDE}:443" in targets


def test_a_name_that_resolves_to_loopback_needs_the_address_granted(world: World) -> None:
    request = {"raw": f"CONNECT localhost:{world.ep} HTTP/1.1\r\n\r\nping"}
    agent_id, out = world.run([f"net.connect@localhost:{world.ep}"], [request], name="named")
    refused = out[0]["raw"]
    assert refused["line"].startswith("HTTP/1.1 403"), refused
    assert "127.0.0.1" in refused["body"] and f"net.connect@127.0.0.1:{world.ep}" in \
        refused["body"]
    assert any("non-global" in r.detail["reason"] for r in world.audit(agent_id, "deny"))
    _, out = world.run([f"net.connect@localhost:{world.ep}", f"net.connect@127.0.0.1:{world.ep}"],
                       [{"tunnel": f"localhost:{world.ep}", "hold": 0.1}], name="named2")
    assert out[0] == {"open": "HTTP/1.1 200 Connection established", "echo": "ping"}


def test_there_is_no_network_but_the_proxy(world: World) -> None:
    _, out = world.run([f"net.connect@127.0.0.1:{world.ep}", f"net.connect@{OUTSIDE}:{world.hp}"],
                       [{"direct": ["127.0.0.1", world.ep]}, {"direct": [OUTSIDE, world.hp]},
                        {"direct": ["1.1.1.1", 443]}, {"tunnel": f"127.0.0.1:{world.ep}",
                                                       "hold": 0.1}], name="direct")
    for o in out[:3]:
        assert "error" in o["direct"], o
    assert out[3]["open"].startswith("HTTP/1.1 200")


def test_a_flood_is_bounded_per_agent_and_a_neighbour_is_served(world: World) -> None:
    target = f"127.0.0.1:{world.ep}"
    with world.k.connect() as admin:
        flooder = admin.proc.spawn(agent("netclient"), name="netflood",
                                   caps=[f"net.connect@{target}"],
                                   argv=[json.dumps([{"flood": 40, "target": target,
                                                      "hold": 8}])])
        try:
            assert wait_until(lambda: b"held" in admin.proc.logs(flooder, "stdout").data,
                              timeout=30)
            _, out = world.run([f"net.connect@{OUTSIDE}:{world.hp}"],
                               [{"get": f"http://{OUTSIDE}:{world.hp}/n"}], name="neighbour")
            assert out[0]["get"]["status"] == 200
        finally:
            admin.proc.kill(flooder)
    held = json.loads(admin_logs_first(world, flooder))["held"]
    assert held == 16  # egress_connections


def admin_logs_first(world: World, agent_id: int) -> str:
    with world.k.connect() as admin:
        return admin.proc.logs(agent_id, "stdout").data.decode().splitlines()[0]


def test_revoking_the_token_closes_its_open_tunnel(world: World) -> None:
    target = f"127.0.0.1:{world.ep}"
    with world.k.connect() as admin:
        agent_id = admin.proc.spawn(agent("netclient"), name="revoked",
                                    caps=[f"net.connect@{target}"],
                                    argv=[json.dumps([{"tunnel": target, "hold": 20}])])
        assert wait_until(lambda: b"open" in admin.proc.logs(agent_id, "stdout").data,
                          timeout=30)
        tokens = admin.caps.list(subject=f"agent:{agent_id}")
        for token in tokens:
            admin.caps.revoke(token.id)
        admin.proc.wait(agent_id, timeout=30)
    opened, ended = world.outcomes(agent_id)
    assert opened["echo"] == "ping"
    assert ended["tunnel"]["closed"] and ended["tunnel"]["after_s"] < 5, ended
    assert wait_until(lambda: world.audit(agent_id, "egress-end"))
    assert world.audit(agent_id, "egress-end")[0].detail["reason"] == "token revoked"


def test_a_delegated_token_sent_to_the_proxy_is_narrowed_and_revocable(world: World) -> None:
    """The agent holds no net right of its own; a token delegated to it (narrower than the
    admin's, for its audience) and sent as Proxy-Authorization opens exactly what it names,
    until it is revoked. A token for another audience is a 407."""
    url = f"http://{OUTSIDE}:{world.hp}"
    steps = [{"get": url + "/own"}, {"mail": 1}, {"get": url + "/delegated"},
             {"get": f"http://{OUTSIDE}:{world.sp}/wider"}, {"mail": 1}, {"get": url + "/gone"},
             {"mail": 1}, {"get": url + "/stranger"}]
    with world.k.connect() as admin:
        agent_id = admin.proc.spawn(agent("netclient"), name="delegated", caps=["ipc.recv"],
                                    argv=[json.dumps(steps)])
        grant = admin.caps.delegate(f"agent:{agent_id}", [f"net.connect@{OUTSIDE}:{world.hp}"])
        admin.ipc.send("delegated", {"token": grant.token})
        assert wait_until(lambda: admin.proc.logs(agent_id, "stdout").data.count(b"\n") >= 4,
                          timeout=30), admin.proc.logs(agent_id, "stdout").data
        admin.caps.revoke(grant.id)
        admin.ipc.send("delegated", {"token": grant.token})
        stranger = admin.caps.delegate("agent:999", [f"net.connect@{OUTSIDE}:{world.hp}"])
        admin.ipc.send("delegated", {"token": stranger.token})
        admin.proc.wait(agent_id, timeout=60)
    out = [next(iter(o.values())) for o in world.outcomes(agent_id)]
    own, _, delegated, wider, _, gone, _, foreign = out
    assert own["status"] == 403
    assert delegated == {"status": 200, "body": BODY + "/delegated"}
    assert wider["status"] == 403, wider
    assert gone["status"] == 403 and "revoked" in gone["body"], gone
    assert foreign["status"] == 407, foreign


def test_the_bytes_budget_ends_the_transfer(world: World) -> None:
    agent_id, out = world.run([f"net.connect@{OUTSIDE}:{world.hp}"],
                              [{"get": f"http://{OUTSIDE}:{world.hp}/big"}], name="metered",
                              group="metered")
    got = out[0]["get"]
    assert got["error"] == "IncompleteRead", got  # the body was cut where the budget ended
    assert wait_until(lambda: world.audit(agent_id, "egress-end"))
    end = world.audit(agent_id, "egress-end")[0].detail
    assert end["up"] + end["down"] == 4000 and "bytes budget" in end["reason"], end
