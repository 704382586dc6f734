"""Several hosts: ``swapd litellm-config``, and a real LiteLLM proxy in front of two swapds.

Two swapd processes on two loopback ports, each with its own ``state_dir`` and
fake backends named ``<node>/<model>``, stand in for two GPU hosts; the reply
text tells which node served a request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import StartDaemon
from daemon import Daemon, fake_preset, free_port, wait_for
from fakes import probe_file
from litellm_proxy import Answer, LiteLLM, litellm_binary, litellm_config, node_args

from swapd import litellm_config as lc
from swapd.litellm_config import NO_KEY, Node, build_config

GIB = 1 << 30


def swapd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "swapd", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def deployments(config: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The deployments of one model name, in config order."""
    return [d for d in config["model_list"] if d["model_name"] == model]


def node(name: str, *models: str) -> dict[str, Any]:
    """Presets for a node: each model a fake upstream called ``<node>/<model>``."""
    return {model: fake_preset(f"{name}/{model}") for model in models}


# ---------------------------------------------------------------- the config


def test_a_model_on_several_nodes_is_one_model_name_with_a_deployment_per_node() -> None:
    """Deployments are grouped by model; each reaches its node's /v1 with the node's key."""
    a, b = Node("http://gpu1:8080", "ka"), Node("http://gpu2:8080")
    config = build_config([(a, [{"id": "qwen"}, {"id": "gemma"}]), (b, [{"id": "qwen"}])])
    assert [d["model_name"] for d in config["model_list"]] == ["gemma", "qwen", "qwen"]
    qwen = [d["litellm_params"] for d in deployments(config, "qwen")]
    assert qwen == [
        {"model": "openai/qwen", "api_base": "http://gpu1:8080/v1", "api_key": "ka"},
        {"model": "openai/qwen", "api_base": "http://gpu2:8080/v1", "api_key": NO_KEY},
    ]
    assert "litellm_settings" not in config
    hooked = build_config([(a, [{"id": "qwen"}])], affinity=True)
    assert hooked["litellm_settings"] == {"callbacks": ["swapd_affinity.affinity"]}


def test_the_router_cools_a_failing_node_down_and_retries_no_timeout() -> None:
    """The first 5xx, 429 or timeout cools a deployment down; a timeout is not run again.

    A request that ran into a preset's request_timeout (504) was retried twice more, so a
    client waited three times that long.
    """
    config = build_config([(Node("http://gpu1:8080"), [{"id": "qwen"}])])
    router = config["router_settings"]
    assert router["retry_policy"]["TimeoutErrorRetries"] == 0
    assert router["allowed_fails_policy"]["TimeoutErrorAllowedFails"] == 0
    assert router["allowed_fails_policy"]["ServiceUnavailableErrorAllowedFails"] == 0


def test_an_alias_is_a_model_name_of_its_own_sent_on_as_the_model() -> None:
    """Clients may use a model's aliases through LiteLLM too (they got LiteLLM's 400)."""
    a = Node("http://gpu1:8080")
    config = build_config([(a, [{"id": "qwen", "aliases": ["q", "qwen-latest"]}])])
    assert [d["model_name"] for d in config["model_list"]] == ["q", "qwen", "qwen-latest"]
    assert {d["litellm_params"]["model"] for d in config["model_list"]} == {"openai/qwen"}


def test_an_unlisted_model_is_in_the_config(start_daemon: StartDaemon) -> None:
    """An ``unlisted`` preset is still served, so LiteLLM must know it to route it.

    The config was built from /v1/models, which leaves such a model out for chat UIs:
    LiteLLM then answered 400 "Invalid model name" for a model swapd serves.
    """
    a = start_daemon(
        {"chat": fake_preset("a/chat"), "embed": fake_preset("a/embed", unlisted=True)}
    )
    config = yaml.safe_load(litellm_config("--node", a.url))
    assert [d["model_name"] for d in config["model_list"]] == ["chat", "embed"]
    assert [m["id"] for m in a.get("/v1/models")[1]["data"]] == ["chat"]  # still not listed
    assert a.get("/v1/models?unlisted=maybe")[0] == 400


def test_litellm_config_asks_each_node_with_its_own_key(start_daemon: StartDaemon) -> None:
    """``--node-key`` follows its ``--node``; ``--key`` covers the rest; a wrong key is refused."""
    a = start_daemon(node("a", "only-a", "shared"), {"api_keys": ["key-a-0123456789abcdef"]})
    b = start_daemon(node("b", "shared"), {"api_keys": ["key-b-0123456789abcdef"]})
    out = swapd(
        "litellm-config",
        *("--node", a.url, "--node-key", "key-a-0123456789abcdef"),
        *("--node", b.url, "--key", "key-b-0123456789abcdef"),
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    keys = {
        d["litellm_params"]["api_base"]: d["litellm_params"]["api_key"]
        for d in config["model_list"]
    }
    assert keys == {
        f"{a.url}/v1": "key-a-0123456789abcdef",
        f"{b.url}/v1": "key-b-0123456789abcdef",
    }
    assert [d["model_name"] for d in config["model_list"]] == ["only-a", "shared", "shared"]
    refused = swapd(
        "litellm-config", "--node", a.url, "--node", b.url, "--key", "key-b-0123456789abcdef"
    )
    assert refused.returncode == 1
    assert f"{a.url} answered 401" in refused.stderr
    assert refused.stdout == ""


def test_litellm_config_takes_one_key_after_each_node_as_the_scale_out_issue_says(
    start_daemon: StartDaemon,
) -> None:
    """``--node URL --key KEY`` per node: each node is asked, and written, with its own key.

    A ``--key`` before every ``--node`` is refused once there are several (whose is it?).
    """
    a = start_daemon(node("a", "only-a"), {"api_keys": ["key-a-0123456789abcdef"]})
    b = start_daemon(node("b", "only-b"), {"api_keys": ["key-b-0123456789abcdef"]})
    out = swapd(
        "litellm-config",
        *("--node", a.url, "--key", "key-a-0123456789abcdef"),
        *("--node", b.url, "--key", "key-b-0123456789abcdef"),
    )
    assert out.returncode == 0, out.stderr
    keys = {
        d["model_name"]: d["litellm_params"]["api_key"]
        for d in yaml.safe_load(out.stdout)["model_list"]
    }
    assert keys == {"only-a": "key-a-0123456789abcdef", "only-b": "key-b-0123456789abcdef"}
    unowned = swapd("litellm-config", "--key", "k1", "--node", a.url, "--key", "k2")
    assert (unowned.returncode, unowned.stdout) == (2, "")
    assert "each must follow the --node it is for" in unowned.stderr


def test_a_key_named_as_an_environment_variable_stays_a_reference(
    start_daemon: StartDaemon,
) -> None:
    """``os.environ/NAME`` is read here to ask the node, and written as is for LiteLLM to read."""
    a = start_daemon(node("a", "m"), {"api_keys": ["key-a-0123456789abcdef"]})
    args = ("litellm-config", "--node", a.url, "--key", "os.environ/NODE_KEY")
    out = swapd(*args, env={"NODE_KEY": "key-a-0123456789abcdef"})
    assert out.returncode == 0, out.stderr
    assert "key-a-0123456789abcdef" not in out.stdout
    (entry,) = yaml.safe_load(out.stdout)["model_list"]
    assert entry["litellm_params"]["api_key"] == "os.environ/NODE_KEY"
    unset = swapd(*args, env={"NODE_KEY": ""})
    assert (unset.returncode, unset.stdout) == (1, "")
    assert "$NODE_KEY, which is not set" in unset.stderr


def test_an_unreachable_node_fails_the_whole_config(start_daemon: StartDaemon) -> None:
    """No partial config: a node that does not answer is an error naming it, exit 1."""
    a = start_daemon(node("a", "m"))
    dead = f"http://127.0.0.1:{free_port()}"
    out = swapd("litellm-config", "--node", a.url, "--node", dead)
    assert (out.returncode, out.stdout) == (1, "")
    assert f"cannot ask {dead} for its models" in out.stderr
    assert "--node-key must follow" in swapd("litellm-config", "--node-key", "k").stderr


@pytest.mark.parametrize("url", ["http://:8080", "http://gpu1:99999", "http://gpu1:port"])
def test_a_node_url_without_a_host_or_a_port_is_refused(url: str) -> None:
    """``http://:8080`` passed and was asked as a URL with no host: refused before asking."""
    out = swapd("litellm-config", "--node", url)
    assert (out.returncode, out.stdout) == (1, "")
    assert f"--node {url!r}: expected a URL like http://gpu1.lan:8080" in out.stderr


def test_a_node_given_twice_is_refused(start_daemon: StartDaemon) -> None:
    """Given twice, a node made two deployments of each of its models, one host."""
    a = start_daemon(node("a", "m"))
    out = swapd("litellm-config", "--node", a.url, "--node", a.url + "/v1/")
    assert (out.returncode, out.stdout) == (1, "")
    assert f"--node {a.url} is given twice" in out.stderr


@pytest.mark.asyncio
async def test_a_node_that_never_answers_is_named_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node that takes the connection but never answers (a hung host) says so.

    aiohttp's timeout is a TimeoutError without a message: the error ended in "models: ".
    """
    monkeypatch.setattr(lc, "_TIMEOUT", aiohttp.ClientTimeout(total=0.5))
    with socket.socket() as hung:  # listens, so the connect succeeds, and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with pytest.raises(lc.NodeError) as caught:
            await lc.gather_models([Node(url)])
    assert str(caught.value) == f"cannot ask {url} for its models: no answer within 0.5 s"


def test_output_file_is_replaced_only_when_the_models_change(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """``-o`` rewrites the file when a node's models change, and leaves it alone otherwise."""
    a = start_daemon(node("a", "m"))
    target = tmp_path / "litellm.yaml"
    first = swapd("litellm-config", "--node", a.url, "-o", str(target))
    assert (first.returncode, first.stderr.strip()) == (0, f"{target}: written")
    assert deployments(yaml.safe_load(target.read_text()), "m")
    assert a.chat("m")[0] == 200  # a model's state is not part of the config
    again = swapd("litellm-config", "--node", a.url, "-o", str(target))
    assert again.stderr.strip() == f"{target}: unchanged"
    (a.root / "presets" / "n.yaml").write_text(yaml.safe_dump(fake_preset("a/n")))
    assert a.request("POST", "/swapd/reload")[0] == 200
    changed = swapd("litellm-config", "--node", a.url, "-o", str(target))
    assert changed.stderr.strip() == f"{target}: written"
    assert deployments(yaml.safe_load(target.read_text()), "n")


# ---------------------------------------------------------------- a real LiteLLM in front


@pytest.fixture
def litellm_bin() -> Path:
    """The ``litellm`` that scripts/litellm-env prepared."""
    binary = litellm_binary()
    if binary is None:
        pytest.skip("LiteLLM not prepared in $SWAPD_CACHE (run scripts/litellm-env)")
    return binary


@pytest.fixture
def start_litellm(litellm_bin: Path, tmp_path: Path) -> Iterator[Any]:
    """Start LiteLLM proxies on configs made by ``swapd litellm-config``; stop them at teardown."""
    started: list[LiteLLM] = []

    def start(daemons: list[Daemon], *extra: str) -> LiteLLM:
        config = litellm_config(*node_args([d.url for d in daemons]), *extra)
        proxy = LiteLLM(litellm_bin, tmp_path / f"litellm{len(started)}", config)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def until_retried(proxy: LiteLLM, model: str, tries: int = 30) -> list[Answer]:
    """Ask for ``model`` until LiteLLM has retried one request, or ``tries`` times; every answer."""
    answers = []
    for _ in range(tries):
        answers.append(proxy.chat(model))
        if answers[-1].retries:
            break
    return answers


@pytest.mark.litellm
def test_models_on_one_node_and_on_both_are_served_through_litellm(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """Each model reaches a node that has it; a shared one reaches both over a few requests."""
    a = start_daemon(node("a", "only-a", "shared"))
    b = start_daemon(node("b", "only-b", "shared"))
    proxy = start_litellm([a, b])
    only_a, only_b = proxy.chat("only-a"), proxy.chat("only-b")
    assert (only_a.status, only_a.served_by) == (200, "a/only-a")
    assert (only_b.status, only_b.served_by) == (200, "b/only-b")
    seen = set()
    for _ in range(40):  # simple-shuffle: both nodes, unless 1 in 2**39
        answer = proxy.chat("shared")
        assert answer.status == 200, answer.body
        seen.add(answer.served_by)
        if len(seen) == 2:
            break
    assert seen == {"a/shared", "b/shared"}


@pytest.mark.litellm
def test_an_alias_reaches_its_model_through_litellm(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """A preset's alias is served through LiteLLM as through swapd itself."""
    a = start_daemon({"one": fake_preset("a/one", aliases=["uno"])})
    proxy = start_litellm([a])
    answer = proxy.chat("uno")
    assert (answer.status, answer.served_by) == (200, "a/one")


@pytest.mark.litellm
def test_an_unlisted_model_is_served_through_litellm(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """A preset left out of /v1/models is served through LiteLLM as through swapd itself."""
    a = start_daemon({"embed": fake_preset("a/embed", unlisted=True)})
    proxy = start_litellm([a])
    answer = proxy.chat("embed")
    assert answer.status == 200, answer.body
    assert answer.served_by == "a/embed"


@pytest.mark.litellm
def test_litellms_health_check_loads_nothing(start_daemon: StartDaemon, start_litellm: Any) -> None:
    """LiteLLM's /health sends every deployment a real chat: the config opts each one out.

    Without that, one look at LiteLLM's health page loaded every model on every node.
    """
    a = start_daemon(node("a", "one", "two"))
    proxy = start_litellm([a])
    with urllib.request.urlopen(f"{proxy.url}/health", timeout=120) as resp:  # noqa: S310
        assert resp.status == 200
        assert json.loads(resp.read())["healthy_count"] == 0
    assert [a.model(m)["state"] for m in ("one", "two")] == ["stopped", "stopped"]
    assert not a.events("backend.spawn")


@pytest.mark.litellm
def test_a_stopped_node_leaves_shared_models_served_and_its_own_a_clear_error(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """One swapd stops: the shared model is served by the other, its own model is a clear error.

    LiteLLM retries the shared model on the other node; a model only the stopped node had
    gets an error naming the failed connection at once.
    """
    a = start_daemon(node("a", "only-a", "shared"))
    b = start_daemon(node("b", "shared"))
    proxy = start_litellm([a, b])
    assert proxy.chat("only-a").status == 200
    a.stop()
    answers = until_retried(proxy, "shared")
    assert [(x.status, x.served_by) for x in answers] == [(200, "b/shared")] * len(answers)
    assert answers[-1].retries >= 1, "no request was sent to the stopped node first"
    lost = proxy.chat("only-a")
    assert lost.status >= 500
    assert "Connection error" in lost.body["error"]["message"]
    assert "only-a" in lost.body["error"]["message"]


@pytest.mark.litellm
def test_a_node_without_memory_for_the_model_sends_it_to_the_other_node(
    start_daemon: StartDaemon, start_litellm: Any, tmp_path: Path
) -> None:
    """503 insufficient_memory from one node: LiteLLM retries on the other, the client sees 200."""
    probe = tmp_path / "gpus.json"
    probe_file.write_devices(probe, {"gpu0": {"total": 2 * GIB, "outside": 0}})
    small = start_daemon(
        {"big": fake_preset("a/big", "--probe-file", str(probe), memory=4 * GIB)},
        {"devices": "auto", "reserve": 0},
        env={"SWAPD_FAKE_PROBE": str(probe)},
    )
    roomy = start_daemon(node("b", "big"))
    proxy = start_litellm([small, roomy])
    answers = until_retried(proxy, "big")
    assert [(x.status, x.served_by) for x in answers] == [(200, "b/big")] * len(answers)
    assert answers[-1].retries >= 1, "no request was sent to the small node first"
    refused = wait_for(
        lambda: [e["status"] for e in small.events("request.done") if e.get("model") == "big"]
    )
    assert set(refused) == {503}


@pytest.mark.litellm
def test_a_stream_whose_load_fails_after_the_pings_is_litellms_500(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """swapd's error event after ``: loading`` reaches LiteLLM's client as a 500, not an event.

    LiteLLM holds its answer until the first chunk, and reads swapd's event as a failed
    connection (neither retried nor cooled down): the docs said the event was passed on.
    """
    dying = fake_preset("a/m", "--start-delay", "4", "--exit-at-start", "3")  # after a ping
    a = start_daemon({"m": dying})
    proxy = start_litellm([a])
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(  # noqa: S310 - loopback URL built here
        f"{proxy.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=60)  # noqa: S310
    message = json.loads(caught.value.read())["error"]["message"]
    assert caught.value.code == 500
    assert "APIConnectionError" in message
    assert "backend for 'm' exited with 3" in message


@pytest.mark.litellm
def test_a_model_no_node_has_any_more_is_a_404_tried_once(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """404 model_not_found passes through with swapd's message and is never retried."""
    a = start_daemon(node("a", "gone", "kept"))
    b = start_daemon(node("b", "gone", "kept"))
    proxy = start_litellm([a, b])
    for d in (a, b):  # the model leaves both nodes after the config was written
        (d.root / "presets" / "gone.yaml").unlink()
        assert d.request("POST", "/swapd/reload")[0] == 200
    answer = proxy.chat("gone")
    assert answer.status == 404, answer.body
    assert "gone" in answer.body["error"]["message"]
    tried = wait_for(
        lambda: [e for d in (a, b) for e in d.events("request.done") if e.get("status") == 404]
    )
    assert len(tried) == 1


@pytest.mark.litellm
def test_affinity_sends_requests_to_the_node_that_holds_the_model(
    start_daemon: StartDaemon, start_litellm: Any
) -> None:
    """With the hook, a model resident on one node is served there, every time."""
    a = start_daemon(node("a", "m"))
    b = start_daemon(node("b", "m"))
    assert b.chat("m")[0] == 200
    proxy = start_litellm([a, b], "--affinity")
    answers = [proxy.chat("m") for _ in range(12)]  # without the hook: both, unless 1 in 2**11
    assert [(x.status, x.served_by) for x in answers] == [(200, "b/m")] * 12
    assert a.model("m")["tier"] != "device"


def test_a_key_given_twice_is_refused_not_silently_replaced() -> None:
    """A second ``--key`` (or ``--node-key`` for one node) is an error, before any node is asked."""
    twice = swapd("litellm-config", "--node", "http://a:1", "--key", "k1", "--key", "k2")
    assert twice.returncode == 2
    assert "--key given twice" in twice.stderr
    node_twice = swapd(
        "litellm-config", "--node", "http://a:1", "--node-key", "k1", "--node-key", "k2"
    )
    assert node_twice.returncode == 2
    assert "--node-key given twice for --node http://a:1" in node_twice.stderr
