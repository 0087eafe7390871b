"""The tool manager end to end: real kernels, sandboxed tool processes, agents, MCP servers."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from kernel.tools.locks import ResourceLocks
from kernel.tools.manifest import Manifest, ManifestError
from tests.conftest import TESTS, KernelProcess, agent, wait_until

TOOLS = Path(__file__).resolve().parent / "progs"
MCP_SERVER = TESTS / "mcp_server.py"


def boot(state: Path, config: str = "", *flags: str) -> KernelProcess:
    path = state.parent / f"{state.name}.toml"
    path.write_text(f'[kernel]\ntool_dirs = ["{TOOLS}"]\ntools_allow_destructive = ["wipe"]\n'
                    + config)
    k = KernelProcess(state)
    k.extra_args = ["--config", str(path), *flags]
    return k.start()


@pytest.fixture(scope="module")
def tk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = boot(tmp_path_factory.mktemp("tools") / "state")
    yield k
    assert k.stop() == 0


@pytest.fixture
def conn(tk: KernelProcess) -> Iterator[sdk.Connection]:
    with tk.connect(timeout=30) as c:
        yield c


def run_agent(conn: sdk.Connection, calls: list, caps: list[str]) -> list:
    aid = conn.proc.spawn(agent("tooluser"), argv=[json.dumps(calls)], caps=caps)
    info = conn.proc.wait(aid, timeout=60)
    assert info.exit_status == 0, conn.proc.logs(aid, stream="stderr").data.decode()
    return info.result


# --- manifests and locks, in process ---------------------------------------------------------

def test_manifest_rejects_bad_declarations() -> None:
    base = {"name": "t", "parameters": {"type": "object"}}
    Manifest.parse(base)
    for bad in ({"name": "bad name"}, {"side_effect": "explosive"}, {"concurrency": 0},
                {"parameters": {"type": "array"}}, {"parameters": {"type": 7}},
                {"timeout_s": -1}, {"resources": {"nope": "path"}}, {"surprise": 1}):
        with pytest.raises(ManifestError):
            Manifest.parse({**base, **bad})


def test_locks_share_readers_serialise_writers_and_keep_order() -> None:
    locks, granted = ResourceLocks(), []

    def ask(name: str, exclusive: bool, *keys: str):
        return locks.acquire(keys, exclusive, lambda: granted.append(name))

    r1, r2 = ask("r1", False, "a"), ask("r2", False, "a")
    w = ask("w", True, "a")
    r3 = ask("r3", False, "a")  # behind the waiting writer: readers cannot starve it
    other = ask("other", True, "b")
    assert granted == ["r1", "r2", "other"]
    locks.release(r1)
    locks.release(r2)
    assert granted[-1] == "w"
    locks.release(w)
    assert granted[-1] == "r3"
    locks.release(r3)
    locks.release(other)
    assert locks.waiting() == 0 and not locks._holders


# --- arguments, capabilities, built-ins ------------------------------------------------------

def test_list_shows_builtins_and_test_tools(conn: sdk.Connection) -> None:
    specs = {s.name: s for s in conn.tools.list()}
    for name in ("calculator", "python", "search", "time", "http_fetch", "crash", "slow"):
        assert name in specs
    assert "broken" not in specs  # its manifest is not a literal: refused, kernel still up
    assert specs["http_fetch"].side_effect == "network"
    assert specs["calculator"].parameters["required"] == ["expression"]


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "'expression' is a required property"),
    ({"expression": 7}, "argument expression: 7 is not of type 'string'"),
    ({"expression": "1", "extra": 1}, "Additional properties are not allowed"),
    (["1+1"], "arguments must be a JSON object"),
])
def test_schema_errors_are_einval_with_the_message(conn: sdk.Connection, arguments: object,
                                                   message: str) -> None:
    with pytest.raises(sdk.InvalidArgument) as info:
        conn.tools.call("calculator", arguments)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_builtins(conn: sdk.Connection) -> None:
    assert conn.tools.call("calculator", expression="2 * (3 + 4) ** 2").value == {"value": 98}
    assert conn.tools.call("calculator", expression="sqrt(16) + pi - pi").value == {"value": 4.0}
    for expr in ("__import__('os')", "9**9**9", "(1).real", "open('/etc/passwd')"):
        result = conn.tools.call("calculator", expression=expr)
        assert result.error and result.value is None
    assert "division by zero" in conn.tools.call("calculator", expression="1/0").error
    now = conn.tools.call("time", timezone="UTC").value
    assert abs(now["unix"] - time.time()) < 60 and now["iso"].endswith("+00:00")
    out = conn.tools.call("python", code="import math\nprint(math.factorial(10))").value
    assert out == {"output": "3628800\n", "exit": 0}


def test_python_sandbox_limits(conn: sdk.Connection) -> None:
    spin = conn.tools.call("python", code="while True: pass", cpu_seconds=1).value
    assert spin["killed"] == "CPU time limit"
    hog = conn.tools.call("python", code="x = bytearray(900 << 20)", memory_mb=64).value
    assert hog["exit"] == 1 and "MemoryError" in hog["output"]
    net = conn.tools.call("python", code=(
        "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")).value
    assert net["exit"] == 1 and "PermissionError" in net["output"]
    err = conn.tools.call("python", code="raise ValueError('no')").value
    assert err["exit"] == 1 and "ValueError: no" in err["output"]


def test_search_sees_only_the_callers_files(tk: KernelProcess, conn: sdk.Connection) -> None:
    script = ("import pathlib, json, sdk\n"
              "pathlib.Path('notes.txt').write_text('alpha\\nthe needle is here\\n')\n"
              "c = sdk.connect()\n"
              "r = c.tools.call('search', query='NEEDLE')\n"
              "c.proc.exit({'hits': r.value['hits']})\n")
    # Its own directory: an agent's code directory is mounted into its sandbox, and must not
    # be the one that holds the kernel's state dir (the mount would hide the agent's home).
    code = tk.state_dir.parent / "searcher"
    code.mkdir(exist_ok=True)
    tk.state_dir.parent.chmod(0o711)
    code.chmod(0o755)
    path = code / "searcher.py"
    path.write_text(script)
    path.chmod(0o644)
    first = conn.proc.spawn(str(path), caps=["tools.call@tool/search"])
    assert conn.proc.wait(first, timeout=60).result["hits"] == [
        {"source": "files", "path": "notes.txt", "line": 2, "text": "the needle is here"}]
    other = conn.proc.spawn(agent("tooluser"), argv=[json.dumps([["search", {"query": "needle"}]])],
                            caps=["tools.call@tool/search"])
    assert conn.proc.wait(other, timeout=60).result == [
        {"value": {"hits": [], "truncated": False}, "error": None}]


def test_capability_denials(conn: sdk.Connection) -> None:
    out = run_agent(conn, [["calculator", {"expression": "1+1"}], ["python", {"code": "1"}],
                           ["http_fetch", {"url": "http://127.0.0.1:9/"}],
                           ["nosuch", {}]],
                    caps=["tools.call@tool/calculator", "tools.call@tool/http_fetch"])
    assert out[0] == {"value": {"value": 2}, "error": None}
    assert out[1]["code"] == "EPERM"
    assert out[2]["code"] == "EPERM" and "tools.call@net/127.0.0.1:9" in out[2]["message"]
    assert out[3]["code"] in ("EPERM", "ENOENT")
    nothing = run_agent(conn, [["time", {}]], caps=[])
    assert nothing[0]["code"] == "EPERM"


def test_http_fetch_works_only_for_granted_hosts(conn: sdk.Connection) -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"hello tool")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        out = run_agent(conn, [["http_fetch", {"url": url}],
                               ["http_fetch", {"url": "http://localhost:9/"}]],
                        caps=["tools.call@tool/http_fetch", "tools.call@net/127.0.0.1:*"])
        # The same grammar as net.connect: a rule for another port of the host is no grant.
        other_port = run_agent(conn, [["http_fetch", {"url": url}]],
                               caps=["tools.call@tool/http_fetch", "tools.call@net/127.0.0.1:1"])
    finally:
        server.shutdown()
    assert out[0]["value"]["text"] == "hello tool" and out[0]["value"]["status"] == 200
    assert out[1]["code"] == "EPERM"
    assert other_port[0]["code"] == "EPERM", other_port


def test_destructive_tools_need_approval(conn: sdk.Connection) -> None:
    assert conn.tools.call("wipe").value == "wiped"  # allowed by the kernel's config
    assert conn.tools.call("shred").value == "shredded"  # a user's own call is its approval
    # An agent's waits for a human: the first call is approved, the second denied.
    aid = conn.proc.spawn(agent("tooluser"), argv=[json.dumps([["shred", {}], ["shred", {}]])],
                          caps=["tools.call@tool/shred"])
    for verdict in ("approve", "deny"):
        deadline = time.monotonic() + 30
        while not (held := [r for r in conn.approvals.list() if r.action == "tools.call shred"]):
            assert time.monotonic() < deadline, "the agent's destructive call was not held"
            time.sleep(0.05)
        assert held[0].principal == f"agent:{aid}"
        getattr(conn.approvals, verdict)(held[0].id)
    info = conn.proc.wait(aid, timeout=60)
    assert info.result[0] == {"value": "shredded", "error": None}
    assert info.result[1]["code"] == "EPERM" and "denied" in info.result[1]["message"]


# --- hostile tools ---------------------------------------------------------------------------

def test_a_crashing_tool_is_an_error_result_and_the_next_call_works(conn: sdk.Connection) -> None:
    for how in ("segv", "exit"):
        result = conn.tools.call("crash", how=how)
        assert result.value is None and "tool process died" in result.error
    assert "SIGSEGV" in conn.tools.call("crash", how="segv").error
    assert conn.tools.call("calculator", expression="1+2").value == {"value": 3}


def test_a_hanging_tool_times_out_and_is_killed(tk: KernelProcess, conn: sdk.Connection) -> None:
    assert conn.tools.call("hang", seconds=0).value == "woke"  # a warm process: time the hang
    start = time.monotonic()
    with pytest.raises(sdk.TimedOut):
        conn.tools.call("hang", tag="deadline")  # its manifest's 3 s
    assert time.monotonic() - start < 8
    pid = int((tk.state_dir / "tools" / "hang" / "pid-deadline").read_text())
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5)


def test_cancellation_kills_the_tool_process(tk: KernelProcess, conn: sdk.Connection) -> None:
    # The caller's own deadline, shorter than the tool's (on a warm process) ...
    assert conn.tools.call("hang", seconds=0).value == "woke"
    with pytest.raises(sdk.TimedOut):
        conn.tools.call("hang", tag="caller", timeout=1.5)
    pid = int((tk.state_dir / "tools" / "hang" / "pid-caller").read_text())
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5)
    # ... and the caller's death.
    aid = conn.proc.spawn(agent("tooluser"), argv=[json.dumps([["hang", {"tag": "dead"}]])],
                          caps=["tools.call@tool/hang"])
    pidfile = tk.state_dir / "tools" / "hang" / "pid-dead"
    assert wait_until(pidfile.exists, timeout=20)
    conn.proc.kill(aid, grace=0)
    pid = int(pidfile.read_text())
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5)


def test_flooding_tools_are_capped(conn: sdk.Connection) -> None:
    with pytest.raises(sdk.QuotaExceeded, match="exceeds the tool's cap"):
        conn.tools.call("flood", how="result")
    printed = conn.tools.call("flood", how="print")
    assert printed.value == "printed" and len(printed.stdout) < 70_000
    assert "more characters dropped" in printed.stdout
    raw = conn.tools.call("flood", how="fd")
    assert raw.value is None and "File too large" in raw.error  # RLIMIT_FSIZE on its log


def test_a_tool_cannot_escape_its_sandbox(tk: KernelProcess, conn: sdk.Connection) -> None:
    seen = conn.tools.call("escape", state_dir=str(tk.state_dir)).value
    assert seen.pop("home") == "succeeded"
    assert all(v.startswith("blocked") for v in seen.values()), seen
    assert not (tk.state_dir / "owned").exists()


# --- concurrency and locks through the kernel ------------------------------------------------

def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    depth = best = 0
    for _, step in events:
        depth += step
        best = max(best, depth)
    return best


def test_concurrency_limit_holds_under_20_callers(tk: KernelProcess) -> None:
    results: list[dict] = []

    def caller() -> None:
        with tk.connect(timeout=60) as c:
            results.append(c.tools.call("slow", seconds=0.3).value)

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for t in threads:
        t.start()
    with tk.connect() as c:  # the dispatch loop never waits for a tool: it answers meanwhile
        c.sys.null()
        assert len(results) < 20  # ~2 s of queued tool work is still going on
    for t in threads:
        t.join()
    assert len(results) == 20
    assert _max_overlap([(r["start"], r["end"]) for r in results]) == 3  # the manifest's limit


def test_writers_serialise_readers_share(conn: sdk.Connection) -> None:
    # Warm the processes first, so what overlaps is the calls, not the process starts.
    conn.tools.call_many([("reader", {"path": f"/warm/{i}", "seconds": 0.3}) for i in range(3)]
                         + [("writer", {"path": f"/warm/{i}", "seconds": 0.3}) for i in (3, 4)])
    writes = conn.tools.call_many([("writer", {"path": "/data/a", "seconds": 0.3})] * 3)
    assert _max_overlap([(r.value["start"], r.value["end"]) for r in writes]) == 1
    reads = conn.tools.call_many([("reader", {"path": "/data/a", "seconds": 0.5})] * 3)
    assert _max_overlap([(r.value["start"], r.value["end"]) for r in reads]) == 3
    other = conn.tools.call_many([("writer", {"path": "/data/b", "seconds": 0.5}),
                                  ("writer", {"path": "/data/c", "seconds": 0.5})])
    assert _max_overlap([(r.value["start"], r.value["end"]) for r in other]) == 2


def test_call_many_returns_every_result_in_order(conn: sdk.Connection) -> None:
    out = conn.tools.call_many([("calculator", {"expression": f"{i} * 2"}) for i in range(6)]
                               + [("calculator", {}), ("nosuch", {})])
    assert [r.value["value"] for r in out[:6]] == [0, 2, 4, 6, 8, 10]
    assert isinstance(out[6], sdk.InvalidArgument) and isinstance(out[7], sdk.NotFound)


def test_tools_need_a_path_grant_outside_the_callers_home(conn: sdk.Connection) -> None:
    out = run_agent(conn, [["reader", {"path": "notes", "seconds": 0}],
                           ["reader", {"path": "/etc/passwd", "seconds": 0}],
                           ["reader", {"path": "../../0/home/x", "seconds": 0}]],
                    caps=["tools.call@tool/reader"])
    assert out[0]["error"] is None  # in its own home, and the tool got the checked path:
    assert out[0]["value"]["path"].endswith("/home/notes") and out[0]["value"]["path"][0] == "/"
    assert out[1]["code"] == "EPERM" and "file/etc/passwd" in out[1]["message"]
    assert out[2]["code"] == "EPERM"


# --- MCP ---------------------------------------------------------------------------------------

def test_mcp_server_mounted_and_called_from_an_agent(conn: sdk.Connection) -> None:
    names = conn.tools.mount("demo", [sys.executable, str(MCP_SERVER)])
    assert names == ["demo.add", "demo.forget", "demo.nap", "demo.whoami"]
    specs = {s.name: s for s in conn.tools.list()}
    assert specs["demo.add"].parameters["required"] == ["a", "b"]
    assert specs["demo.add"].side_effect == "read-only"
    assert specs["demo.forget"].side_effect == "destructive"  # unannotated: MCP's default
    calls = [["demo.add", {"a": 20, "b": 22}], ["demo.add", {"a": "x"}], ["demo.whoami", {}],
             ["demo.forget", {}]]
    aid = conn.proc.spawn(agent("tooluser"), argv=[json.dumps(calls)],
                          caps=["tools.call@tool/demo.add", "tools.call@tool/demo.whoami",
                                "tools.call@tool/demo.forget"])
    # demo.forget is destructive: held for a human, who says no.
    assert wait_until(lambda: any(r.action == "tools.call demo.forget"
                                  for r in conn.approvals.list()), timeout=60)
    held = next(r for r in conn.approvals.list() if r.action == "tools.call demo.forget")
    conn.approvals.deny(held.id, "not today")
    info = conn.proc.wait(aid, timeout=60)
    assert info.exit_status == 0, conn.proc.logs(aid, stream="stderr").data.decode()
    out = info.result
    assert out[0] == {"value": {"result": 42}, "error": None}
    assert out[1]["code"] == "EINVAL"
    seen = json.loads(out[2]["value"])  # unstructured MCP content arrives as its text
    assert seen["etc_hostname"] == "blocked"  # the server runs under Landlock
    assert seen["home"].endswith("tools/mcp-demo")
    assert out[3]["code"] == "EPERM" and "not today" in out[3]["message"]
    with pytest.raises(sdk.TimedOut):
        conn.tools.call("demo.nap", seconds=30, timeout=0.5)
    assert conn.tools.call("demo.add", a=1, b=1).value == {"result": 2}  # still serving
    with pytest.raises(sdk.Busy):
        conn.tools.mount("demo", [sys.executable, str(MCP_SERVER)])
    conn.tools.unmount("demo")
    assert not any(s.name.startswith("demo.") for s in conn.tools.list())
    with pytest.raises(sdk.NotFound):
        conn.tools.call("demo.add", a=1, b=1)


def test_mount_failures_are_reported(conn: sdk.Connection) -> None:
    with pytest.raises(sdk.InvalidArgument, match="no program"):
        conn.tools.mount("ghost", ["no-such-mcp-server"])
    with pytest.raises(sdk.InvalidArgument, match="did not start an MCP server"):
        conn.tools.mount("dud", ["/bin/true"], timeout=30)
    (dud,) = [m for m in conn.tools.mounts() if m.name == "dud"]
    assert dud.state == "failed" and dud.error
    conn.tools.unmount("dud")
    assert "dud" not in [m.name for m in conn.tools.mounts()]


def test_pypi_time_server_from_the_config_and_the_cli(tmp_path: Path) -> None:
    server = Path(sys.executable).parent / "mcp-server-time"
    k = boot(tmp_path / "state", f'mcp_servers = {{time = ["{server}", "--local-timezone", '
                                  '"UTC"]}\n')
    try:
        with k.connect(timeout=30) as c:
            assert wait_until(lambda: any(m.state == "ready" for m in c.tools.mounts()), 30)
            result = c.tools.call("time.get_current_time", timezone="Europe/Paris")
            assert result.value["timezone"] == "Europe/Paris" and result.error is None
        listed = k.cli("tool", "list")
        assert listed.returncode == 0 and "time.convert_time" in listed.stdout
        called = k.cli("tool", "call", "time.convert_time",
                       '{"source_timezone": "UTC", "time": "12:00", "target_timezone": "UTC"}')
        assert called.returncode == 0 and json.loads(called.stdout)["target"]["datetime"]
        assert k.cli("tool", "unmount", "time").returncode == 0
        gone = k.cli("tool", "unmount", "time")
        assert gone.returncode == 1 and "ENOENT" in gone.stderr
    finally:
        assert k.stop() == 0


def test_cli_reports_refusals(tk: KernelProcess) -> None:
    bad = tk.cli("tool", "call", "calculator", '{"expression": 1}')
    assert bad.returncode == 1 and "EINVAL" in bad.stderr
    assert tk.cli("tool", "call", "calculator", "not json").returncode == 2
    ok = tk.cli("tool", "call", "calculator", '{"expression": "6*7"}')
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"value": 42}
