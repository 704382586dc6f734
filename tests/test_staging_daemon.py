"""NVMe staging through the daemon: copy before the first load, budget, checksum, SIGKILL."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import StartDaemon
from daemon import Daemon, fake_preset, wait_for
from tier_truth import TierTruth

MIB = 1024**2


def _model(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(os.urandom(MIB))
    return path


def staged_preset(model: Path, **keys: Any) -> dict[str, Any]:
    """A fake backend whose model is staged; ``${MODEL}`` shows the path it was given."""
    preset = fake_preset("S", "--health-path", "/health", stage=True, model=str(model), **keys)
    preset["cmd"] = [*preset["cmd"], "--name", "${MODEL}"]
    return preset


def _cached_entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def test_a_staged_model_is_copied_before_its_first_load_and_served_from_the_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The backend gets the cached path; the tier goes store -> device -> disk."""
    model = _model(tmp_path / "slow" / "m.gguf", 8 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(cache)})
    assert d.model("s")["tier"] == "store"
    status, body = d.chat("s")
    assert status == 200, body
    [staged] = d.events("model.staged")
    assert Path(staged["path"]).is_relative_to(cache)
    assert Path(staged["path"]).read_bytes() == model.read_bytes()
    [spawn] = d.events("backend.spawn")
    assert staged["path"] in spawn["argv"]
    assert d.model("s")["tier"] == "device"
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    assert d.model("s")["tier"] == "disk"
    _, status_body = d.get("/swapd/status")
    assert status_body["tiers"]["disk"]["bytes"] >= 8 * MIB


def test_the_cache_budget_evicts_the_least_recently_used_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With room for one copy, staging b evicts a's unused copy; a goes back to store."""
    a = _model(tmp_path / "slow" / "a.gguf", 6 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 6 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(a), "b": staged_preset(b)},
        {"cache_dir": str(cache), "cache_budget": "10MiB", "max_running": 1},
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert [e["model"] for e in d.events("model.staged")] == ["a", "b"]
    assert len(_cached_entries(cache)) == 1
    assert (d.model("a")["state"], d.model("a")["tier"]) == ("stopped", "store")
    _, status = d.get("/swapd/status")
    assert status["tiers"]["disk"]["bytes"] <= 10 * MIB


def _two_staged(
    start_daemon: StartDaemon, tmp_path: Path, settings: dict[str, str]
) -> tuple[Daemon, Path, Path, Path]:
    """swapd with two staged 4 MiB models, ``a`` and ``b``, and a cache with ``settings``."""
    a = _model(tmp_path / "slow" / "a.gguf", 4 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 4 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(a), "b": staged_preset(b)}, {"cache_dir": str(cache), **settings}
    )
    return d, a, b, cache


def test_a_cache_budget_lowered_across_a_restart_is_kept_from_the_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Restarted with room for one copy, the cache evicts the least recently used at once.

    It kept both until a copy needed room: over its budget at rest, and both models in
    ``disk``.
    """
    d, a, _, cache = _two_staged(start_daemon, tmp_path, {"cache_budget": "16MiB"})
    for name in ("a", "b"):  # b's copy used last
        assert d.chat(name)[0] == 200
        assert d.request("POST", f"/swapd/models/{name}/unload")[0] == 200
    d.stop()
    d.settings = {"cache_dir": str(cache), "cache_budget": "5MiB"}
    d.start()
    status = TierTruth(d, cache).check()
    assert status["tiers"]["disk"] == {"bytes": 4 * MIB, "budget": 5 * MIB}
    assert [(m["name"], m["tier"]) for m in status["models"]] == [("a", "store"), ("b", "disk")]
    assert [e["source"] for e in d.events("staging.evict")] == [str(a)]


def test_a_cache_budget_lowered_by_reload_evicts_what_no_longer_fits(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The idle copy goes at once; the copy in use once its model lets it go.

    ``cache_budget`` was bound at start: the reload named it in ``restart_needed``, and
    the cache held both copies, over the budget it reported, until a restart.
    """
    d, a, b, cache = _two_staged(start_daemon, tmp_path, {"cache_budget": "16MiB"})
    truth = TierTruth(d, cache)
    assert d.chat("a")[0] == 200
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    assert d.chat("b")[0] == 200  # b runs from its copy
    d.settings = {"cache_dir": str(cache), "cache_budget": "3MiB"}
    d.write()
    assert d.request("POST", "/swapd/reload")[1]["restart_needed"] == []
    wait_for(lambda: d.model("a")["tier"] == "store")
    assert (d.model("b")["tier"], len(_cached_entries(cache))) == ("device", 1)
    assert d.request("POST", "/swapd/models/b/unload")[0] == 200
    status = truth.check()
    assert status["tiers"]["disk"] == {"bytes": 0, "budget": 3 * MIB}
    assert [(m["name"], m["tier"]) for m in status["models"]] == [("a", "store"), ("b", "store")]
    assert [e["source"] for e in d.events("staging.evict")] == [str(a), str(b)]


def test_a_cache_budget_raised_by_reload_lets_a_waiting_copy_go(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A copy waits for room that only a running model's copy holds; a reload makes room.

    The reload named ``cache_budget`` in ``restart_needed``, and the copy waited out
    ``queue_timeout``.
    """
    settings = {"cache_budget": "5MiB", "queue_timeout": "10m"}
    d, _, _, cache = _two_staged(start_daemon, tmp_path, settings)
    assert d.chat("a")[0] == 200  # runs from its copy: never evicted
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(d.chat, "b")
        wait_for(lambda: d.events("model.stage.wait"))
        d.settings = {**d.settings, "cache_budget": "16MiB"}
        d.write()
        assert d.request("POST", "/swapd/reload")[1]["restart_needed"] == []
        assert load.result()[0] == 200
    assert len(_cached_entries(cache)) == 2


def test_a_copy_evicted_for_a_copy_that_then_fails_puts_its_model_back_in_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Room made for a copy whose checksum fails still evicted a's copy: a is in store.

    The evicted paths used to be forgotten only after a copy succeeded, so a kept
    showing the disk tier for a copy that was gone.
    """
    a = _model(tmp_path / "slow" / "a.gguf", 6 * MIB)
    bad = _model(tmp_path / "slow" / "bad.gguf", 6 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"a": staged_preset(a), "bad": staged_preset(bad, sha256="0" * 64)},
        {"cache_dir": str(cache), "cache_budget": "10MiB"},
    )
    assert d.chat("a")[0] == 200
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    assert d.model("a")["tier"] == "disk"
    status, body = d.chat("bad")
    assert (status, body["error"]["code"]) == (500, "stage_failed")
    assert _cached_entries(cache) == []  # a's copy made room, then bad's was deleted
    assert (d.model("a")["state"], d.model("a")["tier"]) == ("stopped", "store")


def test_no_room_in_the_cache_is_a_503_with_the_numbers(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A copy larger than the whole cache budget fails at once with the sizes.

    At once, not after ``queue_timeout`` (ten minutes here, past the client's wait):
    no stop can ever make that room.
    """
    model = _model(tmp_path / "slow" / "big.gguf", 8 * MIB)
    d = start_daemon(
        {"s": staged_preset(model), "other": fake_preset("O")},
        {
            "cache_dir": str(tmp_path / "cache"),
            "cache_budget": "4MiB",
            "queue_timeout": "600s",
            "max_running": 1,
        },
    )
    assert d.chat("other")[0] == 200
    status, body = d.chat("s")
    assert status == 503
    assert body["error"]["code"] == "cache_full"
    assert "cannot stage 's'" in body["error"]["message"]
    assert d.model("s")["state"] == "stopped"  # refused for room: nothing wrong with it
    assert "cannot stage" in d.model("s")["error"]


def test_a_checksum_mismatch_fails_clearly_and_caches_nothing(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A wrong sha256 fails the load with both digests and leaves no entry in the cache."""
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon({"s": staged_preset(model, sha256="0" * 64)}, {"cache_dir": str(cache)})
    status, body = d.chat("s")
    assert status == 500
    assert body["error"]["code"] == "stage_failed"
    actual = hashlib.sha256(model.read_bytes()).hexdigest()
    assert actual in body["error"]["message"]
    assert "0" * 64 in body["error"]["message"]
    assert _cached_entries(cache) == []
    assert d.leftovers() == []


def test_a_checksum_mismatch_while_the_load_waits_still_fails_it(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The copy fails while the load waits for a busy model: the load fails with it.

    It used to be dropped: the model then started from the unverified original.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon(
        {"busy": fake_preset("B"), "s": staged_preset(model, sha256="0" * 64)},
        {"cache_dir": str(tmp_path / "cache"), "max_running": 1},
    )
    assert d.chat("busy")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(d.chat, "busy", "long", fake_delay=4)
        wait_for(lambda: d.model("busy")["in_flight"] == 1)
        status, body = d.chat("s")
        assert long.result()[0] == 200
    assert (status, body["error"]["code"]) == (500, "stage_failed")
    assert [e["model"] for e in d.events("backend.spawn")] == ["busy"]


def test_a_copy_staged_for_a_load_that_waits_is_not_evicted_for_another(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a is staged and waits for room; b's copy must not evict a's, which a is about to open.

    Both start from their copies, a first.
    """
    a = _model(tmp_path / "slow" / "a.gguf", 6 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 6 * MIB)
    cache = tmp_path / "cache"
    d = start_daemon(
        {"busy": fake_preset("C"), "a": staged_preset(a), "b": staged_preset(b)},
        {"cache_dir": str(cache), "cache_budget": "10MiB", "max_running": 1},
    )
    assert d.chat("busy")[0] == 200
    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(d.chat, "busy", "long", fake_delay=4)
        wait_for(lambda: d.model("busy")["in_flight"] == 1)
        for_a = pool.submit(d.chat, "a")
        wait_for(lambda: [e for e in d.events("model.staged") if e["model"] == "a"])
        for_b = pool.submit(d.chat, "b")
        assert [f.result()[0] for f in (long, for_a, for_b)] == [200, 200, 200]
    spawned = {e["model"]: e["argv"] for e in d.events("backend.spawn")}
    for name in ("a", "b"):
        assert any(Path(arg).is_relative_to(cache) for arg in spawned[name]), spawned[name]


def _load_in_background(d: Daemon, model: str) -> None:
    """Ask for a load from another thread; swapd is killed mid-request on purpose."""

    def load() -> None:
        with contextlib.suppress(OSError):
            d.request("POST", f"/swapd/models/{model}/load", timeout=120)

    threading.Thread(target=load, daemon=True).start()


def test_sigkill_of_swapd_mid_copy_leaves_no_copy_that_looks_complete(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """After swapd is killed during a copy, the next swapd cleans it and stages again."""
    model = _model(tmp_path / "slow" / "m.gguf", 768 * MIB)
    cache = tmp_path / "cache"
    d: Daemon = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(cache)})

    _load_in_background(d, "s")
    wait_for(
        lambda: any(p.name.startswith(".") for p in cache.iterdir()) if cache.exists() else False,
        timeout=30,
        interval=0.002,
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert _cached_entries(cache) == []  # nothing with a final name
    d.start()
    assert d.model("s")["tier"] == "store"
    assert not any(p.name.startswith(".partial") for p in cache.iterdir())
    assert d.chat("s")[0] == 200
    [entry] = _cached_entries(cache)
    assert entry.exists()


def test_sigkill_of_swapd_right_after_publish_leaves_a_usable_copy(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A copy renamed into place but not yet fsynced survives kill -9 of swapd.

    The kernel still holds its data, so the next swapd (same boot) syncs it, keeps it and
    serves from it without copying again.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 256 * MIB)
    cache = tmp_path / "cache"
    d: Daemon = start_daemon({"s": staged_preset(model)}, {"cache_dir": str(cache)})

    _load_in_background(d, "s")
    [entry] = wait_for(
        lambda: _cached_entries(cache) if cache.exists() else [], timeout=60, interval=0.002
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    unsynced_at_kill = "unsynced_boot" in (entry / "entry.json").read_text()
    d.start()
    assert d.model("s")["tier"] == "disk"
    assert bool(d.events("staging.sync.recover")) == unsynced_at_kill
    assert "unsynced_boot" not in (entry / "entry.json").read_text()
    assert d.chat("s")[0] == 200
    assert len(d.events("staging.copy.start")) == 1  # the first swapd's copy, and no other
    copy = entry / "data" / "m.gguf"
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(model.read_bytes()).digest()
    spawn = d.events("backend.spawn")[-1]  # the log is shared: the first swapd's may be there
    assert str(copy) in spawn["argv"]


def test_a_sha256_changed_to_another_than_the_copys_puts_the_model_in_store(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The copy was checked against the old digest: its load would refuse it and copy again.

    It used to show ``disk`` until that load failed its check.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    actual = hashlib.sha256(model.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    d = start_daemon({"s": staged_preset(model, sha256=actual)}, {"cache_dir": str(cache)})
    assert d.chat("s")[0] == 200
    assert d.request("POST", "/swapd/models/s/unload")[0] == 200
    assert d.model("s")["tier"] == "disk"
    d.presets = {"s": staged_preset(model, sha256="0" * 64)}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    wait_for(lambda: d.model("s")["tier"] == "store")
    [moved] = [e for e in d.events("model.tier") if e.get("tier") == "store"]
    assert moved["reason"] == "sha256_changed"
    status, body = d.chat("s")
    assert (status, body["error"]["code"]) == (500, "stage_failed")
    assert actual in body["error"]["message"]
    # Back to the file's digest: copied and checked again, served from the copy.
    d.presets = {"s": staged_preset(model, sha256=actual)}
    d.write()
    assert d.request("POST", "/swapd/reload")[0] == 200
    assert d.chat("s")[0] == 200
    assert d.model("s")["tier"] == "device"


def test_a_sha256_changed_while_swapd_was_down_puts_the_model_in_store_at_start(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The copy found at start was checked against the old digest: not the model's copy."""
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    actual = hashlib.sha256(model.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    d = start_daemon({"s": staged_preset(model, sha256=actual)}, {"cache_dir": str(cache)})
    assert d.chat("s")[0] == 200
    assert d.stop() == 0
    d.presets = {"s": staged_preset(model, sha256="0" * 64)}
    d.write()
    d.start()
    assert d.model("s")["tier"] == "store"
    [moved] = d.events("model.tier")
    assert (moved["tier"], moved["reason"]) == ("store", "sha256_changed")
    assert actual in moved["why"]
