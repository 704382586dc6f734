"""The ``swapd`` verbs against a running daemon: tables, JSON, progress, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from conftest import StartDaemon
from daemon import fake_preset, free_port, wait_for, write_layout

from swapd import _render


def swapd(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI (stdout is a pipe, not a terminal) and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "swapd", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_version_and_help_are_written_for_users() -> None:
    """``--version`` names the release; ``--help`` lists the verbs, no internal docstring."""
    version = swapd("--version")
    assert (version.returncode, version.stdout.strip()) == (0, "swapd 0.1.0")
    helped = swapd("--help").stdout
    for verb in ("serve", "check", "status", "load", "unload", "logs", "reload", "plan"):
        assert f"    {verb} " in helped
    assert "only place that exits" not in helped
    assert "SWAPD_URL" in helped


def test_status_shows_tier_error_ttl_left_and_last_use(start_daemon: StartDaemon) -> None:
    """A table (tier, pid, port, TTL left, time in state, last use, errors); JSON too."""
    d = start_daemon(
        {"a": fake_preset("A", ttl="10m"), "b": fake_preset("B", "--exit-at-start", "3")}
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 502
    out = swapd("status", "--url", d.url)
    assert out.returncode == 0, out.stderr
    header, row_a, row_b, *rest = out.stdout.splitlines()
    assert header.split() == [
        "MODEL", "STATE", "TIER", "PID", "PORT", "DEVICE", "IN-FLIGHT", "WAITING",
        "MEMORY", "TTL", "LEFT", "IN", "STATE", "FOR", "LAST", "USED",
    ]  # fmt: skip
    assert row_a.split()[:3] == ["a", "ready", "device"]
    model_a = d.model("a")
    assert row_a.split()[3:5] == [str(model_a["pid"]), str(model_a["port"])]
    ttl_left, in_state, used, ago = row_a.split()[-4:]
    assert re.fullmatch(r"(10m00|9m[0-5]\d)s", ttl_left), row_a
    assert re.fullmatch(r"\d+s", in_state), row_a  # a time in the state, not "12s ago"
    assert re.fullmatch(r"\d+s", used), row_a
    assert ago == "ago"
    assert row_b.split()[:3] in (["b", "backoff", "disk"], ["b", "failed", "disk"])  # 1 s
    assert any(line.strip().startswith("b: backend for 'b' exited with 3") for line in rest)
    body = json.loads(swapd("status", "--url", d.url, "--json").stdout)
    assert {m["name"] for m in body["models"]} == {"a", "b"}


def test_the_address_comes_from_swapd_url_or_the_config(start_daemon: StartDaemon) -> None:
    """Without --url: $SWAPD_URL, else the listen address of --config or $SWAPD_CONFIG."""
    d = start_daemon({"a": fake_preset("A")})
    assert swapd("status", env={"SWAPD_URL": d.url}).returncode == 0
    assert swapd("status", env={"SWAPD_CONFIG": str(d.config_path)}).returncode == 0
    assert swapd("status", "--config", str(d.config_path)).returncode == 0
    gone = swapd("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 1
    assert gone.stderr.startswith("swapd: cannot reach http://127.0.0.1:")


def test_load_draws_progress_and_ends_with_the_model_and_its_state(
    start_daemon: StartDaemon,
) -> None:
    """Plain lines off a terminal, the last naming the model; exit 1 with the reason."""
    d = start_daemon(
        {"a": fake_preset("A", "--start-delay", "1"), "b": fake_preset("B", "--exit-at-start", "3")}
    )
    out = swapd("load", "a", "--url", d.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("a: ready (pid ")
    assert [line.split()[1] for line in lines[:-1]][-2:] == ["starting", "ready"]
    failed = swapd("load", "b", "--url", d.url)
    assert failed.returncode == 1
    assert failed.stderr.startswith("b: backoff: backend for 'b' exited with 3")
    unknown = swapd("load", "nope", "--url", d.url)
    assert unknown.returncode == 1
    assert "not configured" in unknown.stderr
    assert "failed" not in unknown.stderr  # no state for a model that is not there


def test_unload_and_logs(start_daemon: StartDaemon) -> None:
    """``unload`` stops a model; ``logs`` prints its backend's output, ``-f`` new lines too."""
    d = start_daemon({"a": fake_preset("A")})
    assert d.chat("a")[0] == 200
    out = swapd("logs", "a", "--url", d.url, "-n", "1")
    assert out.stdout.startswith("fake-upstream: A listening on 127.0.0.1:")
    argv = [sys.executable, "-m", "swapd", "logs", "a", "-f", "--url", d.url]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as follow:
        try:
            assert follow.stdout is not None
            assert "listening on" in follow.stdout.readline()  # what was there
            assert swapd("unload", "a", "--url", d.url).stdout.strip() == "a: stopped"
            assert d.chat("a")[0] == 200  # a new process prints again
            assert "listening on" in follow.stdout.readline()
        finally:
            follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=30) == -signal.SIGINT


def test_ctrl_c_in_a_loop_of_loads_ends_the_loop(start_daemon: StartDaemon) -> None:
    """Ctrl-C during `swapd load` ends the CLI by SIGINT, no traceback, and the shell's loop.

    It exited 130, which a shell takes for a child that dealt with the interrupt itself:
    the loop went on and loaded the next model.
    """
    d = start_daemon({"slow": fake_preset("S", "--start-delay", "30"), "b": fake_preset("B")})
    cli = f"{sys.executable} -m swapd load $m --url {d.url}"
    script = f"for m in slow b; do {cli}; done"
    with subprocess.Popen(
        ["bash", "-c", script], start_new_session=True, stderr=subprocess.PIPE, text=True
    ) as loop:
        wait_for(lambda: d.model("slow")["state"] == "starting")
        os.killpg(loop.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, err = loop.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert loop.returncode == -signal.SIGINT  # bash ended with its child
    assert d.model("b")["state"] == "stopped"  # never loaded


def test_unload_all_stops_every_model(start_daemon: StartDaemon) -> None:
    """``unload --all`` stops every model and prints each; NAME and --all exclude each other."""
    d = start_daemon({"a": fake_preset("A"), "b": fake_preset("B")})
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    out = swapd("unload", "--all", "--url", d.url)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["a: stopped", "b: stopped"]
    both = swapd("unload", "a", "--all", "--url", d.url)
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


def test_plan_asks_the_daemon_or_plans_locally(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Which models fit together: from the running daemon, or from the config alone."""
    d = start_daemon(
        {"a": fake_preset("A", memory="1GiB"), "huge": fake_preset("H", memory="1000TiB")}
    )
    out = swapd("plan", "--url", d.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DEVICE")
    body = json.loads(swapd("plan", "--url", d.url, "--json").stdout)
    fits = {m["name"]: m["fit"] for m in body["models"]}
    assert fits == {"a": "together", "huge": "never"}
    config = write_layout(tmp_path, free_port(), {"a": fake_preset("A", memory="1GiB")}, {})
    local = swapd("plan", "--config", str(config), "--json")
    assert local.returncode == 0, local.stderr
    assert "not running" in local.stderr
    assert json.loads(local.stdout)["models"][0]["fit"] == "together"


def test_a_local_plan_keeps_its_warnings_out_of_the_json(tmp_path: Path) -> None:
    """A torn footprints.json is a footprints.drop warning: on stderr, not in the plan's JSON."""
    config = write_layout(tmp_path, free_port(), {"a": fake_preset("A", memory="1GiB")}, {})
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "footprints.json").write_text('{"a": {"bytes": 3')
    local = swapd("plan", "--config", str(config), "--json")
    assert local.returncode == 0, local.stderr
    assert "footprints.drop" in local.stderr
    assert json.loads(local.stdout)["models"][0]["fit"] == "together"


def test_serve_listen_overrides_the_config(tmp_path: Path) -> None:
    """``swapd serve --listen HOST:PORT`` serves there, whatever the config says."""
    port = free_port()
    config = write_layout(tmp_path, free_port(), {"a": fake_preset("A")}, {"state_dir": "state"})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swapd",
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _healthy(port), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    bad = swapd("serve", "--config", str(config), "--listen", "nowhere")
    assert bad.returncode == 2
    assert bad.stderr.startswith('swapd: --listen: expected "host:port"')


def test_the_time_in_state_column_is_a_time_not_an_ago() -> None:
    """IN STATE FOR reads "1m15s", as TTL LEFT does; only LAST USED says "ago"."""
    now = time.time()
    model = {
        "name": "a", "state": "ready", "tier": "device", "pid": 7, "port": 8, "device": "cpu",
        "in_flight": 0, "waiting": 0, "memory": {"need": None}, "ttl_left": None,
        "since": now - 75, "last_used": now - 5,
    }  # fmt: skip
    header, row = _render.status({"models": [model]}).splitlines()
    assert header.split()[-5:] == ["IN", "STATE", "FOR", "LAST", "USED"]
    assert row.split()[-3:] == ["1m15s", "5s", "ago"]


def test_the_embedded_default_says_how_to_try_it_as_json_off_a_terminal(tmp_path: Path) -> None:
    """With no config and no terminal, the hint to try the embedded model is an event too."""
    port = free_port()
    state = tmp_path / "state"
    (state / "swapd" / "models").mkdir(parents=True)
    (state / "swapd" / "models" / "gemma-3-270m-it-Q4_K_M.gguf").touch()  # never loaded here
    env = {k: v for k, v in os.environ.items() if k not in ("SWAPD_CONFIG", "STATE_DIRECTORY")}
    log = tmp_path / "swapd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swapd", "serve", "--listen", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "XDG_STATE_HOME": str(state)},
        )
    try:
        wait_for(lambda: _healthy(port), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]  # each line is JSON
    hint = next(e for e in events if e["event"] == "swapd.embedded")
    assert hint["example"].startswith(f"curl http://127.0.0.1:{port}/v1/completions")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_load_with_json_keeps_stdout_to_the_json(start_daemon: StartDaemon) -> None:
    """``swapd load NAME --json | jq`` works: the progress lines go to stderr."""
    d = start_daemon({"a": fake_preset("A", "--start-delay", "1")})
    out = swapd("load", "a", "--url", d.url, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "ready"
    assert "a  starting" in out.stderr


def test_check_warns_of_an_open_address_also_with_no_presets(tmp_path: Path) -> None:
    """The access warnings do not wait for the first preset."""
    config = write_layout(tmp_path, free_port(), {}, {"listen": f"0.0.0.0:{free_port()}"})
    out = swapd("check", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "no presets" in out.stderr
    assert "without api_keys or admin_keys" in out.stderr, out.stderr


def test_a_backends_escape_sequences_reach_no_terminal(start_daemon: StartDaemon) -> None:
    r"""A failed start's last output is shown with its control characters written out.

    ``swapd load`` and ``swapd status`` print the error, which carries what the backend
    printed last: an OSC 52 there (set the clipboard) or ``ESC[2K`` (erase the line) went
    to the operator's terminal as it came.
    """
    script = r"printf 'x\033]52;c;Zm9v\007\033[2Kboom\n'; exit 3"
    d = start_daemon({"a": {"backend": "command", "cmd": ["sh", "-c", script, "sh", "${PORT}"]}})
    failed = swapd("load", "a", "--url", d.url)
    assert failed.returncode == 1
    assert "exited with 3" in failed.stderr
    status = swapd("status", "--url", d.url)
    for out in (failed.stderr, status.stdout):
        assert r"\x1b]52;c;Zm9v\x07\x1b[2Kboom" in out, out
        assert "\x1b" not in out


def test_a_reader_that_goes_away_ends_the_cli_quietly(start_daemon: StartDaemon) -> None:
    """``swapd status | head -0``: no traceback, and the exit of a tool ended by SIGPIPE."""
    d = start_daemon({"a": fake_preset("A")})
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before swapd writes
    try:
        done = subprocess.run(
            [sys.executable, "-m", "swapd", "status", "--json", "--url", d.url],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 128 + signal.SIGPIPE


def test_serve_and_check_name_a_nul_in_state_dir_without_a_traceback(tmp_path: Path) -> None:
    """``swapd check`` said ok; ``swapd serve`` died in mkdir with ValueError's traceback."""
    config = write_layout(tmp_path, free_port(), {"a": fake_preset("A")}, {})
    config.write_text(config.read_text().replace("state_dir: state", 'state_dir: "st\\0ate"'))
    for verb in ("check", "serve"):
        done = swapd(verb, "--config", str(config))
        assert done.returncode == (1 if verb == "check" else 2)
        assert "Traceback" not in done.stderr
        assert f"{config}:" in done.stderr
        assert "state_dir: a NUL character in 'st\\x00ate'" in done.stderr
