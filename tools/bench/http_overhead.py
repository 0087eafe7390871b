"""The HTTP door's fixed cost per call: the same syscalls through the SDK and through the
OpenAI-compatible endpoint with the official `openai` client, one caller, sequential.

    .venv/bin/python tools/bench/http_overhead.py [--calls 200] [--model smollm2]

`llm.models` isolates the transport (no model work); a 1-token `llm.chat` adds the scheduler
and one engine step. Raw HTTP (stdlib `http.client`, keep-alive) shows the door's own cost; the
`openai` client adds its own (request building, pydantic parsing) in the caller's process. The
difference of medians is what each OpenAI-API call pays on top of the SDK path; the LLM
benchmark's per-call latency puts it in proportion (`tools/bench/llm.py --http` measures the
whole workload, but on a shared machine its two arms see different load).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernelproc import boot_kernel  # noqa: E402

HELLO = [{"role": "user", "content": "hi"}]


def timed(fn, calls: int) -> list[float]:
    fn()  # warm up (connections, first-use costs)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--model", default="smollm2", help="NAME[=SOURCE] as for agentos boot")
    args = p.parse_args()
    import openai

    import sdk

    state = Path(tempfile.mkdtemp(prefix="agentos-http.")) / "state"
    kernel = boot_kernel(state, "--preload", "--model", args.model, "--http", "127.0.0.1:0")
    name = args.model.partition("=")[0]
    try:
        with sdk.connect(state_dir=state, timeout=600) as conn:
            key = conn.caps.delegate("http:bench", ["llm.*"]).token
            url = f"http://{(state / 'run' / 'http').read_text().strip()}/v1"
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            raw = http.client.HTTPConnection(*url[len("http://"):-len("/v1")].split(":"))
            auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            body = json.dumps({"model": name, "messages": HELLO, "max_tokens": 1,
                               "temperature": 0})

            def fetch(method: str, path: str, data: str | None = None) -> None:
                try:
                    raw.request(method, f"/v1{path}", data, auth)
                    resp = raw.getresponse()
                except (BrokenPipeError, http.client.RemoteDisconnected):
                    raw.close()  # idle past the server's keep-alive: reconnect (the warm-up)
                    raw.request(method, f"/v1{path}", data, auth)
                    resp = raw.getresponse()
                resp.read()
                assert resp.status == 200, resp.status

            n = args.calls
            rows = {
                "llm.models": (
                    timed(conn.llm.models, n),
                    timed(lambda: fetch("GET", "/models"), n),
                    timed(client.models.list, n)),
                "llm.chat, 1 token": (
                    timed(lambda: conn.llm.chat(HELLO, model=name, max_tokens=1), n // 4),
                    timed(lambda: fetch("POST", "/chat/completions", body), n // 4),
                    timed(lambda: client.chat.completions.create(
                        model=name, messages=HELLO, max_tokens=1, temperature=0), n // 4)),
            }
    finally:
        kernel.terminate()
        kernel.wait(60)
    print(f"  {'call (p50)':<20} {'SDK':>9} {'HTTP':>9} {'openai client':>14}")
    for call, times in rows.items():
        a, b, c = (statistics.median(t) * 1e3 for t in times)
        print(f"  {call:<20} {a:7.2f}ms {b:7.2f}ms {c:12.2f}ms")
    a, b, c = (statistics.median(t) * 1e3 for t in rows["llm.chat, 1 token"])
    print(f"RESULT door_overhead_ms={b - a:.2f} openai_client_overhead_ms={c - a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
