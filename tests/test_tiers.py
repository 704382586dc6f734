"""The ram tier: vLLM sleeps and wakes; llama-server keeps warm pages; both go down to disk.

A sleeping vLLM wakes without a new process and goes down to disk on ram_ttl or
when the ram budget is full. The vLLM here is ``tests/fakes/fake_vllm.py``, run as
the preset's binary: it speaks vLLM's command line and sleep API, holds real memory
that it frees while asleep, and aborts running streams when told to sleep, as vLLM
does.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import StartDaemon
from daemon import Daemon, fake_preset, fake_stats, hook_env, wait_for

from swapd.pages import memory_fs

MIB = 1024**2
HOLD = 96 * MIB


def vllm_preset(binary: str, model_dir: Path, **keys: Any) -> dict[str, Any]:
    """A ``backend: vllm`` preset on the fake, with sleep level 1 unless told otherwise."""
    model_dir.mkdir(exist_ok=True)
    (model_dir / "weights.safetensors").write_bytes(b"\0" * 1024)
    return {"backend": "vllm", "model": str(model_dir), "binary": binary, "sleep": 1, **keys}


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_ttl_demotes_vllm_to_sleep_and_the_process_survives(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """An idle vLLM past its TTL is put to sleep: same pid, ram tier, memory freed."""
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={"FAKE_VLLM_HOLD_BYTES": str(HOLD)},
    )
    assert d.chat("v")[0] == 200
    before = d.model("v")
    pid = before["pid"]
    awake_rss = _rss(pid)
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    after = d.model("v")
    assert after["pid"] == pid
    assert after["tier"] == "ram"
    assert fake_stats(after["port"])["sleeping"] is True
    assert awake_rss - _rss(pid) > HOLD // 2, "sleep did not free the fake's memory"
    [event] = wait_for(lambda: d.events("model.sleep"))  # logged once the cost is read
    assert event["reason"] == "ttl"
    assert event["sleep_level"] == 1


def test_a_request_wakes_a_sleeping_vllm_without_a_new_process(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A request for an asleep model wakes it (/wake_up, /is_sleeping); no spawn happens."""
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={"FAKE_VLLM_HOLD_BYTES": str(HOLD)},
    )
    assert d.chat("v")[0] == 200
    pid = d.model("v")["pid"]
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    status, body = d.chat("v", "again")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "v: again"
    model = d.model("v")
    assert (model["state"], model["tier"], model["pid"]) == ("ready", "device", pid)
    assert len(d.events("backend.spawn")) == 1
    assert [e["how"] for e in d.events("model.load.done")] == ["start", "wake"]
    assert fake_stats(model["port"])["sleeping"] is False


def _stream(d: Daemon, model: str, into: list[str]) -> None:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True}
    ).encode()
    req = urllib.request.Request(  # noqa: S310 - loopback
        d.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
        into.extend(line.decode().strip() for line in resp if line.strip())


def test_no_stream_is_cut_by_a_demotion(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A model with a stream in flight is never put to sleep: the stream ends whole.

    ``max_running: 1`` makes a request for b want a's place while a streams; a sleeps
    only after its stream is done (the fake would abort it if it slept earlier).
    """
    d = start_daemon(
        {
            "a": vllm_preset(vllm_binary, tmp_path / "a"),
            "b": vllm_preset(vllm_binary, tmp_path / "b"),
        },
        {"max_running": 1},
        env={"FAKE_VLLM_UPSTREAM_ARGS": "--chunks 20 --chunk-interval 0.1"},
    )
    assert d.chat("a")[0] == 200
    lines: list[str] = []
    streaming = threading.Thread(target=_stream, args=(d, "a", lines))
    streaming.start()
    wait_for(lambda: d.model("a")["in_flight"] == 1)
    assert d.chat("b")[0] == 200
    streaming.join(timeout=60)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 21
    states = {m: (d.model(m)["state"], d.model(m)["tier"]) for m in ("a", "b")}
    assert states == {"a": ("asleep", "ram"), "b": ("ready", "device")}
    assert fake_stats(d.model("a")["port"])["cancelled"] == 0


def test_shutdown_during_a_sleep_waits_for_it_then_stops_the_backend(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """SIGTERM while a vLLM is being put to sleep: the sleep ends, then the stop; exit 0."""
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={"FAKE_VLLM_HOLD_BYTES": str(HOLD), "FAKE_VLLM_SLEEP_DELAY": "2"},
    )
    assert d.chat("v")[0] == 200
    pid = d.model("v")["pid"]
    wait_for(lambda: d.model("v")["state"] == "sleeping", timeout=40)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0
    assert [e["pid"] for e in d.events("backend.exit")] == [pid]
    assert not psutil.pid_exists(pid)
    log = [json.loads(line) for line in d.log_path.read_text().splitlines()]
    assert [e["event"] for e in log if e.get("level") in ("error", "critical")] == []
    assert [e["reason"] for e in d.events("model.sleep")] == ["ttl"]


# Loaded by swapd's interpreter (``sitecustomize``): reading v's cost the first time it
# sleeps takes 3 s more, and a file says when it is done, so a wake can land meanwhile.
SLOW_SLEEP_COST = """
import asyncio
import pathlib

import swapd.manager

cost = swapd.manager.Manager._asleep_cost
done = pathlib.Path({done!r})


async def slowly(self, slot):
    if slot.preset.name != "v" or done.exists():
        return await cost(self, slot)
    await asyncio.sleep(3)
    try:
        return await cost(self, slot)
    finally:
        done.touch()


swapd.manager.Manager._asleep_cost = slowly
"""


def test_a_wake_while_the_sleep_cost_is_read_books_no_ram(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """Woken before its sleep's cost was read: once read, the cost is not booked in ram.

    It was: a ready model then counted in the ram tier, against ram_budget. The wake's
    stream keeps it busy (so awake) until the cost has been read.
    """
    hook = tmp_path / "hook"
    done = hook / "cost-read"
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={
            "FAKE_VLLM_HOLD_BYTES": str(HOLD),
            "FAKE_VLLM_UPSTREAM_ARGS": "--chunks 100 --chunk-interval 0.1",
            **hook_env(hook, SLOW_SLEEP_COST.format(done=str(done))),
        },
    )
    assert d.chat("v")[0] == 200
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    assert not done.exists()  # its cost is being read
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(d.chat, "v", stream=True)  # the wake, then 10 s of chunks
        wait_for(lambda: d.model("v")["in_flight"] == 1)
        wait_for(done.exists)
        status = d.get("/swapd/status")[1]
        assert status["tiers"]["ram"]["bytes"] == 0
        [v] = status["models"]
        assert (v["state"], v["tier"], v["memory"]["ram"] or 0) == ("ready", "device", 0)
        assert d.events("model.sleep") == []  # it never reached the ram tier
        assert stream.result()[0] == 200


@pytest.mark.parametrize("force", [False, True])
def test_an_unload_during_a_sleep_stops_the_model(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path, *, force: bool
) -> None:
    """An unload while a vLLM is being put to sleep waits for the sleep, then stops it.

    It answered at once and did nothing: the model went on to sleep in the ram tier.
    """
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={"FAKE_VLLM_SLEEP_DELAY": "2"},
    )
    assert d.chat("v")[0] == 200
    pid = d.model("v")["pid"]
    wait_for(lambda: d.model("v")["state"] == "sleeping", timeout=40)
    query = "?force=true" if force else ""
    status, body = d.request("POST", f"/swapd/models/v/unload{query}")
    assert (status, body["state"], body["tier"]) == (200, "stopped", "disk")
    assert [e["pid"] for e in d.events("backend.exit")] == [pid]


def test_ram_ttl_moves_a_sleeping_model_down_to_disk(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """After ram_ttl in the ram tier, the sleeping process is stopped: tier disk."""
    d = start_daemon({"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s", ram_ttl="5s")})
    assert d.chat("v")[0] == 200
    pid = d.model("v")["pid"]
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=40)
    assert d.model("v")["tier"] == "disk"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [e["model"] for e in d.events("model.ram_ttl.expire")] == ["v"]


def test_a_refused_wake_leaves_ram_ttl_counting(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """ram_ttl fires while a wake waits behind a busy model; the wake is refused (503).

    The model is still asleep, and its ram_ttl is over: it goes down to disk then. It
    used to stay in the ram tier for good, its timer spent while it was queued.
    """
    d = start_daemon(
        {
            "v": vllm_preset(vllm_binary, tmp_path / "m", ram_ttl="2s"),
            "c": fake_preset("C"),
        },
        {"max_running": 1, "queue_timeout": "4s", "max_wait": "60s"},
    )
    assert d.chat("v")[0] == 200
    assert d.chat("c")[0] == 200  # v sleeps to make room: ram_ttl counts from here
    assert d.model("v")["state"] == "asleep"
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(d.chat, "c", "long", fake_delay=8)
        wait_for(lambda: d.model("c")["in_flight"] == 1)
        wake = pool.submit(d.chat, "v")  # a wake, queued behind c until queue_timeout
        wait_for(lambda: d.model("v")["state"] == "queued")
        assert d.model("v")["tier"] == "ram"  # its process sleeps on meanwhile
        status, body = wake.result()
        assert (status, body["error"]["code"]) == (503, "queue_timeout")
        wait_for(lambda: d.model("v")["state"] == "stopped", timeout=20)
        assert busy.result()[0] == 200
    assert d.model("v")["tier"] == "disk"
    assert [e["model"] for e in d.events("model.ram_ttl.expire")] == ["v"]


def test_a_ram_ttl_given_while_a_wake_waits_holds_once_the_wake_is_refused(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A reload shortens ram_ttl while the model's wake is queued; the wake is refused.

    The timer was cancelled and not armed again (the model was queued): it slept on.
    """
    presets = {
        "v": vllm_preset(vllm_binary, tmp_path / "m", ram_ttl="60s"),
        "c": fake_preset("C"),
    }
    d = start_daemon(presets, {"max_running": 1, "queue_timeout": "4s", "max_wait": "60s"})
    assert d.chat("v")[0] == 200
    assert d.chat("c")[0] == 200  # v sleeps
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(d.chat, "c", "long", fake_delay=8)
        wait_for(lambda: d.model("c")["in_flight"] == 1)
        wake = pool.submit(d.chat, "v")
        wait_for(lambda: d.model("v")["state"] == "queued")
        d.presets = {**presets, "v": {**presets["v"], "ram_ttl": "2s"}}
        d.write()
        assert d.request("POST", "/swapd/reload")[0] == 200
        assert wake.result()[0] == 503
        assert busy.result()[0] == 200
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=20)


def test_a_reload_applies_ram_ttl_and_a_lower_ram_budget_to_sleepers(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A reload's ram_ttl and a lower ram_budget apply to models asleep already.

    A sleeper given a ram_ttl goes down when it expires; a ram_budget lowered to 0 sends
    the sleepers to disk at once. Both used to apply only to later sleeps.
    """
    presets = {n: vllm_preset(vllm_binary, tmp_path / n) for n in ("a", "b")}
    d = start_daemon(presets, {"max_running": 1})
    for name in ("a", "b", "a"):
        assert d.chat(name)[0] == 200
    assert (d.model("b")["state"], d.model("b")["tier"]) == ("asleep", "ram")
    d.presets = {**presets, "b": {**presets["b"], "ram_ttl": "1s"}}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: d.model("b")["state"] == "stopped", timeout=20)
    assert [e["model"] for e in d.events("model.ram_ttl.expire")] == ["b"]
    assert d.chat("b")[0] == 200
    assert (d.model("a")["state"], d.model("a")["tier"]) == ("asleep", "ram")
    d.settings = {**d.settings, "ram_budget": 0}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: d.model("a")["state"] == "stopped", timeout=20)
    _, status = d.get("/swapd/status")
    assert status["tiers"]["ram"] == {"bytes": 0, "budget": 0}


def test_the_ram_budget_is_respected(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """With room in the ram tier for one sleeper, a second demotion pushes the older down.

    ``max_running: 1`` evicts on every swap. On a CPU host a demotion is planned with
    the model's measured footprint (192 MiB held plus the process, over half the
    256 MiB budget); once asleep it costs what its process still holds.
    """
    d = start_daemon(
        {name: vllm_preset(vllm_binary, tmp_path / name) for name in ("a", "b", "c")},
        {"max_running": 1, "ram_budget": "256MiB"},
        env={"FAKE_VLLM_HOLD_BYTES": str(192 * MIB)},
    )
    for name in ("a", "b", "c"):
        assert d.chat(name)[0] == 200
        wait_for(lambda n=name: any(e["model"] == n for e in d.events("model.measure")))
    tiers = {m: (d.model(m)["state"], d.model(m)["tier"]) for m in ("a", "b", "c")}
    assert tiers == {"a": ("stopped", "disk"), "b": ("asleep", "ram"), "c": ("ready", "device")}
    _, status = d.get("/swapd/status")
    ram = status["tiers"]["ram"]
    assert ram["budget"] == 256 * MIB
    assert 0 < ram["bytes"] <= ram["budget"]
    assert d.model("b")["memory"]["ram"] == ram["bytes"]


def test_ram_budget_zero_stops_instead_of_sleeping(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """``ram_budget: 0`` turns the tier off: an evicted model is stopped, not put to sleep."""
    d = start_daemon(
        {name: vllm_preset(vllm_binary, tmp_path / name) for name in ("a", "b")},
        {"max_running": 1, "ram_budget": 0},
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert (d.model("a")["state"], d.model("a")["tier"]) == ("stopped", "disk")
    assert not d.events("model.sleep")


def test_a_refused_sleep_flag_is_retried_without_it_and_said_in_status(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """A backend refusing --enable-sleep-mode is started again without it; status says so."""
    d = start_daemon(
        {"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s")},
        env={"FAKE_VLLM_REFUSE_SLEEP_MODE": "1"},
    )
    assert d.chat("v")[0] == 200
    spawns = d.events("backend.spawn")
    assert len(spawns) == 2
    assert "--enable-sleep-mode" in spawns[0]["argv"]
    assert "--enable-sleep-mode" not in spawns[1]["argv"]
    model = d.model("v")
    assert model["sleep"]["level"] == 1
    assert "refused --enable-sleep-mode" in model["sleep"]["note"]
    # The development endpoints still answer, so the model still sleeps and wakes.
    wait_for(lambda: d.model("v")["state"] == "asleep", timeout=40)
    assert d.chat("v")[0] == 200
    assert len(d.events("backend.spawn")) == 2


def test_sleep_auto_is_off_on_a_cpu_only_host(
    start_daemon: StartDaemon, vllm_binary: str, tmp_path: Path
) -> None:
    """``sleep: auto`` means 0 on host RAM: no sleep flag, and the TTL stops the model."""
    d = start_daemon({"v": vllm_preset(vllm_binary, tmp_path / "m", ttl="1s", sleep="auto")})
    assert d.chat("v")[0] == 200
    [spawn] = d.events("backend.spawn")
    assert "--enable-sleep-mode" not in spawn["argv"]
    wait_for(lambda: d.model("v")["state"] == "stopped", timeout=40)
    assert not d.events("model.sleep")


@pytest.mark.llama
def test_a_gguf_on_tmpfs_is_not_held_in_the_ram_tier(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """Its pages live in RAM already: a hold would count them twice against the budget."""
    shm = Path("/dev/shm")  # noqa: S108 - the tmpfs the test needs
    if memory_fs(shm) != "tmpfs":
        pytest.skip(f"{shm} is not a tmpfs here")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        model = folder / "t.gguf"
        shutil.copyfile(tiny_gguf, model)
        d = start_daemon({"t": {"backend": "llama-server", "model": str(model), "ttl": "1s"}})
        assert d.chat("t")[0] == 200
        wait_for(lambda: d.model("t")["state"] == "stopped", timeout=40)
        view = d.model("t")
        assert (view["tier"], view["pages"], view["memory"]["ram"]) == ("disk", None, 0)
        assert d.get("/swapd/status")[1]["tiers"]["ram"]["bytes"] == 0
        assert d.chat("t")[0] == 200  # it starts from the tmpfs as from anywhere
    finally:
        shutil.rmtree(folder)


@pytest.mark.llama
def test_llama_server_ttl_keeps_its_pages_in_ram_then_starts_from_them(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """A llama-server past its TTL stops with its GGUF pages locked; the next start drops them."""
    d = start_daemon({"t": {"backend": "llama-server", "model": str(tiny_gguf), "ttl": "1s"}})
    assert d.chat("t")[0] == 200
    wait_for(lambda: d.model("t")["state"] == "stopped", timeout=40)
    model = d.model("t")
    assert model["tier"] == "ram"
    assert model["pages"] == {"locked": True, "note": None}
    assert model["memory"]["ram"] == tiny_gguf.stat().st_size
    with urllib.request.urlopen(d.url + "/metrics", timeout=30) as resp:  # noqa: S310 - loopback
        metrics = resp.read().decode()
    # One move down (a stop that keeps its pages), counted once, not once per action.
    assert 'swapd_evictions_total{model="t",reason="ttl"} 1.0' in metrics.splitlines()
    assert d.chat("t")[0] == 200
    model = d.model("t")
    assert (model["tier"], model["pages"], model["memory"]["ram"]) == ("device", None, 0)
