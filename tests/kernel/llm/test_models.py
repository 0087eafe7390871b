"""Model names from elsewhere (issue 18.2): aliases from the kernel's config answer at every
door (SDK, OpenAI, AIOS), capabilities and accounts see the served name, an unknown name is a
404 (NotFound in the SDK) that lists what is served, and `agentos run --model` sets an agent's
default model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

import sdk
from kernel.config import Config, ModelConfig
from tests.conftest import TEST_TIER, KernelProcess, agent


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    """Two served models (the same tiny weights): `tiny`, also called gpt-4o-mini (its own
    `aliases`), and `other`, called gpt-3.5-turbo (the `[aliases]` table)."""
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
        listed = {m.name: m.aliases for m in admin.llm.models()}
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
            ("gpt-3.5-turbo", "other")}
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
    assert out["listed"] == ["gpt-3.5-turbo", "gpt-4o-mini", "other", "tiny"]
