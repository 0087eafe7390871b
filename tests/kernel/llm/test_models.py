"""Model names from elsewhere (issue 18.2): aliases from the kernel's config answer at every
door (SDK, OpenAI, AIOS), capabilities and accounts see the served name, an unknown name is a
404 (NotFound in the SDK) that lists what is served, and `agentos run --model` sets an agent's
default model. Routes (issue 23.4): a name whose rules pick a served model per call, resolved
before the capability check like an alias, counted in `sys.stats`, /metrics and `agentos top`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

import sdk
from kernel.config import Config, ModelConfig, RouteConfig
from tests.conftest import TEST_TIER, KernelProcess, agent


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    """Two served models (the same tiny weights): `tiny`, also called gpt-4o-mini (its own
    `aliases`), and `other`, called gpt-3.5-turbo (the `[aliases]` table); and a route `auto`
    that sends prompts of up to 40 bytes to tiny (by its alias), the rest to other."""
    tmp = tmp_path_factory.mktemp("models")
    config = tmp / "kernel.toml"
    config.write_text(f"""
[kernel]
http = "127.0.0.1:0"
preload = true
[models.tiny]
source = "{tiny_dir}"
aliases = ["gpt-4o-mini"]
[models.other]
source = "{tiny_dir}"
[aliases]
"gpt-3.5-turbo" = "other"
[routes.auto]
rules = [{{model = "gpt-4o-mini", max_prompt_bytes = 40}}, {{model = "other"}}]
""")
    k = KernelProcess(tmp / "state")
    k.extra_args = ["--config", str(config)]
    k.start()
    yield k
    assert k.stop() == 0


def http_key(k: KernelProcess, *caps: str, name: str = "models") -> tuple[str, dict[str, str]]:
    minted = k.cli("token", "mint", "--for", f"http:{name}", *(f"--cap={c}" for c in caps))
    assert minted.returncode == 0, minted.stderr
    url = f"http://{(k.state_dir / 'run' / 'http').read_text().strip()}"
    return url, {"Authorization": f"Bearer {minted.stdout.strip()}"}


def chat_body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_config_refuses_aliases_that_hide_or_miss_a_model() -> None:
    models = {"a": ModelConfig("a", aliases=["x"]), "b": ModelConfig("b")}
    assert Config(models=models, aliases={"y": "b"}).model_aliases() == {"x": "a", "y": "b"}
    for aliases, why in (({"b": "a"}, "is the name of a served model"),
                         ({"z": "nope"}, "which is not served"),
                         ({"x": "b"}, "names both"),
                         ({"bad/name": "a"}, "bad alias")):
        with pytest.raises(ValueError, match=why):
            Config(models=models, aliases=aliases).model_aliases()


def test_the_sdk_answers_an_alias_from_its_model_and_names_what_is_served(
        named: KernelProcess) -> None:
    with named.connect() as admin:
        listed = {m.name: m.aliases for m in admin.llm.models() if m.backend != "route"}
        assert listed == {"tiny": ["gpt-4o-mini"], "other": ["gpt-3.5-turbo"]}
        messages = [{"role": "user", "content": "hi"}]
        assert admin.llm.chat(messages, model="gpt-4o-mini", max_tokens=2).model == "tiny"
        assert admin.llm.chat(messages, model="gpt-3.5-turbo", max_tokens=2).model == "other"
        with pytest.raises(sdk.NotFound) as err:
            admin.llm.chat(messages, model="gpt-5", max_tokens=2)
        assert "tiny (alias gpt-4o-mini)" in err.value.message
        assert "other (alias gpt-3.5-turbo)" in err.value.message
        # Counted under the served name, the alias nowhere.
        usage = admin.sys.stats().llm_usage
        assert usage["tiny"]["calls"] >= 1 and "gpt-4o-mini" not in usage, usage


def test_an_alias_never_widens_a_right(named: KernelProcess) -> None:
    """`llm.chat@llm/other` reaches `other` by its alias, never `tiny` by tiny's alias."""
    with named.connect() as admin:
        agent_id = admin.proc.spawn(agent("model_agent"), name="narrow",
                                    caps=["llm.chat@llm/other"],
                                    argv=[json.dumps(["gpt-3.5-turbo", "gpt-4o-mini", "tiny"])])
        info = admin.proc.wait(agent_id, timeout=60)
    assert info.exit_status == 0, info
    ok, via_alias, direct = info.result["answers"]
    assert ok == "other"
    assert via_alias.startswith("EPERM") and "llm/tiny" in via_alias, via_alias
    assert direct.startswith("EPERM"), direct


def test_the_openai_door_resolves_aliases_and_404s_the_unknown(named: KernelProcess) -> None:
    url, auth = http_key(named, "llm.*")
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        listed = client.get("/v1/models").json()["data"]
        assert {(m["id"], m["root"]) for m in listed} == {
            ("tiny", "tiny"), ("other", "other"), ("gpt-4o-mini", "tiny"),
            ("gpt-3.5-turbo", "other"), ("auto", "auto")}
        assert client.get("/v1/models/gpt-4o-mini").json()["root"] == "tiny"
        missing = client.get("/v1/models/gpt-5")
        assert missing.status_code == 404 and "tiny" in missing.json()["error"]["message"]
        reply = client.post("/v1/chat/completions", json=chat_body("gpt-4o-mini"))
        assert reply.status_code == 200 and reply.json()["model"] == "tiny", reply.text
        stream = client.post("/v1/chat/completions",
                             json={**chat_body("gpt-3.5-turbo"), "stream": True})
        first = json.loads(stream.text.split("data: ", 2)[1].split("\n")[0])
        assert first["model"] == "other", stream.text
        unknown = client.post("/v1/chat/completions", json=chat_body("gpt-5"))
        assert unknown.status_code == 404, unknown.text
        error = unknown.json()["error"]
        assert error["code"] == "model_not_found"
        assert "gpt-5" in error["message"] and "tiny (alias gpt-4o-mini)" in error["message"]
        # A name no model can have (a hub path) is unknown too, not a malformed request.
        hub = client.post("/v1/chat/completions", json=chat_body("meta-llama/Llama-3.1-8B"))
        assert hub.status_code == 404 and "served: tiny" in hub.json()["error"]["message"]


def test_config_refuses_routes_that_hide_a_name_miss_a_model_or_leave_calls_nowhere() -> None:
    models = {"a": ModelConfig("a", aliases=["x"]), "b": ModelConfig("b")}

    def route(*rules: dict) -> RouteConfig:
        return RouteConfig.parse("r", {"rules": list(rules)})

    config = Config(models=models, routes={"r": route({"model": "x", "max_prompt_bytes": 9},
                                                      {"model": "b"})})
    config.check_routes()
    assert [rule.model for rule in config.routes["r"].rules] == ["a", "b"]  # x is a's alias
    assert config.routes["r"].pick(9, 256) == "a" and config.routes["r"].pick(10, 256) == "b"
    for table, why in (({"rules": []}, "non-empty"),
                       ({"rules": [{"model": "a", "max_prompt_bytes": 5}]}, "last rule"),
                       ({"rules": [{"model": "a", "min_bytes": 5}, {"model": "b"}]},
                        "unknown keys: min_bytes"),
                       ({"rules": [{"model": "a", "max_tokens": 0}, {"model": "b"}]}, ">= 1"),
                       ({"rules": [{"model": "a", "max_tokens": "9"}, {"model": "b"}]}, ">= 1"),
                       ({"rules": [{"max_tokens": 9}]}, "model = NAME"),
                       ({"rule": []}, "want rules")):
        with pytest.raises(ValueError, match=why):
            RouteConfig.parse("r", table)
    for name, rules, why in (("a", [{"model": "b"}], "already a served model's"),
                             ("x", [{"model": "b"}], "already a served model's"),
                             ("r", [{"model": "nope"}], "not served"),
                             ("bad/name", [{"model": "b"}], "bad name")):
        with pytest.raises(ValueError, match=why):
            Config(models=models, routes={name: RouteConfig.parse(name, {"rules": rules})}
                   ).check_routes()


def test_a_route_picks_by_prompt_size_at_every_door_and_counts_where_it_sent(
        named: KernelProcess) -> None:
    import io
    import time

    from rich.console import Console

    from kernel.doors.http.metrics import render
    from userland import top

    short, long = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "x" * 41}]
    with named.connect() as admin:
        before = admin.sys.stats().models.get("auto", {})
        assert admin.llm.chat(short, model="auto", max_tokens=2).model == "tiny"
        assert admin.llm.chat(long, model="auto", max_tokens=2).model == "other"
        (info,) = [m for m in admin.llm.models() if m.name == "auto"]
        assert (info.backend, info.picks) == ("route", ["tiny", "other"])
    url, auth = http_key(named, "llm.*", name="routes")
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        body = {**chat_body("auto"), "messages": long}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200 and reply.json()["model"] == "other", reply.text
        stream = client.post("/v1/chat/completions", json={**chat_body("auto"), "stream": True})
        first = json.loads(stream.text.split("data: ", 2)[1].split("\n")[0])
        assert first["model"] == "tiny", stream.text
    with named.connect() as admin:
        stats = admin.sys.stats()
        models = {m.name: m for m in admin.llm.models()}
    now = stats.models["auto"]
    sent = {key: now[key] - before.get(key, 0) for key in now}
    assert sent == {"calls": 4, "route.tiny": 2, "route.other": 2}, now
    text = render(stats, {"open": 0, "peers": 0, "accepted": 0, "refused": {}}).decode()
    assert f'agentos_llm_routed_total{{model="other",route="auto"}} {now["route.other"]}' in text
    console = Console(file=io.StringIO(), width=200)
    console.print(top.render(top.Sample(time.monotonic(), stats, [], models), None))
    row = next(line for line in console.file.getvalue().splitlines() if " auto " in line)
    assert f"tiny {now['route.tiny']:.0f}, other {now['route.other']:.0f}" in row, row


def test_a_route_never_widens_a_right(named: KernelProcess) -> None:
    """A key for `tiny` alone may call `auto` while the route picks tiny, and gets 403 naming
    llm/other when it picks other; a key for `auto` alone reaches neither."""
    url, auth = http_key(named, "llm.chat@llm/tiny", name="narrow-route")
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        ok = client.post("/v1/chat/completions", json=chat_body("auto"))
        assert ok.status_code == 200 and ok.json()["model"] == "tiny", ok.text
        body = {**chat_body("auto"), "messages": [{"role": "user", "content": "x" * 41}]}
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 403 and "llm/other" in refused.text, refused.text
    url, auth = http_key(named, "llm.chat@llm/auto", name="route-only")
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        refused = client.post("/v1/chat/completions", json=chat_body("auto"))
        assert refused.status_code == 403 and "llm/tiny" in refused.text, refused.text


def test_the_aios_door_resolves_aliases_and_404s_the_unknown(named: KernelProcess) -> None:
    url, auth = http_key(named, "llm.*", name="aios")

    def query(llms: list[dict]) -> httpx.Response:
        body = {"query_type": "llm", "agent_name": "a", "query_data": {
            "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2,
            "llms": llms}}
        return httpx.post(f"{url}/query", json=body, headers=auth, timeout=60)

    ok = query([{"name": "gpt-3.5-turbo"}])
    assert ok.status_code == 200 and ok.json()["response"]["model"] == "other", ok.text
    # The first listed that is served answers; none served is a 404, not the default.
    assert query([{"name": "gpt-5"}, {"name": "gpt-4o-mini"}]).json()["response"]["model"] == \
        "tiny"
    missing = query([{"name": "gpt-5"}])
    assert missing.status_code == 404 and "served" in missing.json()["detail"], missing.text
    hub = query([{"name": "meta-llama/Llama-3.1-8B"}])
    assert hub.status_code == 404 and "served" in hub.json()["detail"], hub.text


def test_run_model_sets_the_agents_default(named: KernelProcess) -> None:
    run = named.cli("run", "--wait", "--model", "gpt-3.5-turbo", "--cap", "llm.chat",
                    "--name", "defaulted", agent("model_agent"), "--", "[null, \"tiny\"]")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["answers"] == ["other", "tiny"]  # no model named: its own default
    assert set(result["env"].values()) == {"gpt-3.5-turbo"}
    with named.connect() as admin:
        newest = max(a.id for a in admin.proc.ps())
    shown = named.cli("info", "--json", str(newest))
    assert json.loads(shown.stdout)["model"] == "gpt-3.5-turbo", shown.stdout


def test_run_with_an_unknown_model_starts_nothing(named: KernelProcess) -> None:
    with named.connect() as admin:
        before = len(admin.proc.ps())
        run = named.cli("run", "--model", "gpt-5", agent("model_agent"), "--", "[]")
        assert run.returncode == 1
        assert "ENOENT" in run.stderr and "gpt-4o-mini" in run.stderr, run.stderr
        assert len(admin.proc.ps()) == before



@pytest.mark.skipif(TEST_TIER not in ("strict", "standard"),
                    reason="the in-sandbox door needs a sandbox with a uid of its own")
def test_an_unmodified_openai_script_in_the_sandbox_gets_its_model_by_alias(
        named: KernelProcess) -> None:
    """The headline case: `agentos run --model gpt-3.5-turbo` of a script that knows only
    OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL, through its in-sandbox door."""
    run = named.cli("run", "--wait", "--model", "gpt-3.5-turbo", "--cap", "llm.*",
                    "--name", "oai-alias", agent("openai_model"), timeout=120)
    assert run.returncode == 0, run.stderr
    with named.connect() as admin:
        mine = [a for a in admin.proc.ps() if a.name == "oai-alias"][-1]
        out = json.loads(admin.proc.logs(mine.id, "stdout").data.decode())
    assert out["asked"] == "gpt-3.5-turbo" and out["answered"] == "other", out
    assert out["listed"] == ["auto", "gpt-3.5-turbo", "gpt-4o-mini", "other", "tiny"]
