"""``swapd import-llama-swap``: a llama-swap config.yaml becomes a layout swapd accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_cli import swapd

from swapd.config import Config, load_config
from swapd.llama_swap import command, macros
from swapd.presets import Preset

CONFIG = """\
# A llama-swap config as its users write them.
healthCheckTimeout: 300
globalTTL: 600
logLevel: debug
startPort: 10001
sendLoadingState: true
apiKeys:
  - "sk-local-0123456789abcdef"
macros:
  llama: /opt/llama.cpp/bin/llama-server --host 127.0.0.1 --port ${PORT}
  models: ${env.MODELS_HOME}
  ctx: 8192
  common: -ngl 99 -c ${ctx}
models:
  qwen:
    name: Qwen 2.5 7B
    description: general chat
    cmd: |
      # the main chat model
      ${llama}
        -m ${models}/qwen.gguf \\
        ${common}
        --api-key secret
    aliases: [qwen2.5, gpt-4o-mini]
    ttl: 300
    env: ["CUDA_VISIBLE_DEVICES=0", "LLAMA_API_KEY=x", "ECHO_PORT=${PORT}"]
    filters:
      stripParams: "temperature, top_p, model"
      setParams:
        top_k: 20
        model: nope
    useModelName: Qwen/Qwen2.5-7B
    concurrencyLimit: 4
    metadata:
      family: qwen
      ctx: ${ctx}
      released: 2024-09-19
  embed:
    cmd: llama-server --port ${PORT} --model ${models}/embed.gguf --embeddings
    unlisted: true
    checkEndpoint: /v1/models
    ttl: 0
  vl:
    macros:
      ctx: 4096
    cmd: >
      vllm serve ${models}/vl-model --port ${PORT} --host 0.0.0.0 --max-model-len ${ctx}
    unloadTimeout: 30
  sd:
    cmd: |
      docker run --rm --init --name ${MODEL_ID} -p ${PORT}:8080 -v ${models}:/models
      ghcr.io/ggml-org/llama.cpp:server -m /models/x.gguf --port 8080
    cmdStop: docker stop ${MODEL_ID}
    proxy: http://127.0.0.1:${PORT}
    checkEndpoint: none
groups:
  always:
    persistent: true
    swap: false
    exclusive: false
    members: [embed]
  big:
    members: [qwen, vl]
hooks:
  on_startup:
    preload: [embed]
peers:
  openrouter:
    proxy: https://openrouter.ai/api
"""


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The model files the config's commands name, under $MODELS_HOME."""
    home = tmp_path / "models"
    (home / "vl-model").mkdir(parents=True)
    (home / "qwen.gguf").write_bytes(b"GGUF")
    (home / "embed.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("MODELS_HOME", str(home))
    return home


def _line_of(text: str, needle: str) -> int:
    """The 1-based line of ``text`` where ``needle`` is first written."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def _preset(config: Config, name: str) -> Preset:
    preset = config.preset(name)
    assert preset is not None, name
    return preset


def _import(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return swapd("import-llama-swap", str(config), "--out", str(out), *extra)


def test_a_realistic_config_becomes_presets_swapd_check_accepts(
    tmp_path: Path, models: Path
) -> None:
    """Every backend kind, macros, filters, groups and hooks land in the presets' fields."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "swapd"
    done = _import(config, out)
    assert done.returncode == 0, done.stderr
    assert (out / "swapd.yaml").stat().st_mode & 0o777 == 0o600  # it holds the keys
    checked = swapd("check", "--config", str(out / "swapd.yaml"))
    assert checked.returncode == 0, checked.stderr
    loaded = load_config(out / "swapd.yaml")
    assert loaded.api_keys == ("sk-local-0123456789abcdef",)
    assert (loaded.host, loaded.port) == ("127.0.0.1", 8080)
    qwen, embed, vl, sd = (_preset(loaded, name) for name in ("qwen", "embed", "vl", "sd"))
    assert (qwen.backend, qwen.binary, qwen.model) == (
        "llama-server",
        "/opt/llama.cpp/bin/llama-server",
        models / "qwen.gguf",
    )
    assert qwen.args == ("-ngl", "99", "-c", "8192")  # no --host, --port, -m, --api-key
    # LLAMA_API_KEY is swapd's to set; ${PORT} stays text in env (a note says so).
    # CUDA_VISIBLE_DEVICES=0 is read as devices: [0], which swapd places the model by.
    assert (qwen.env, qwen.devices) == ({"ECHO_PORT": "${PORT}"}, (0,))
    assert qwen.aliases == ("qwen2.5", "gpt-4o-mini")
    assert (qwen.ttl, qwen.start_timeout, qwen.concurrency) == (300, 300, 4)
    assert qwen.use_model_name == "Qwen/Qwen2.5-7B"
    assert qwen.filters is not None
    assert qwen.filters.strip == ("temperature", "top_p")
    assert qwen.filters.set == {"top_k": 20}
    assert qwen.description == "Qwen 2.5 7B: general chat"
    # A whole macro keeps its type; a YAML date, which JSON cannot carry, becomes its text.
    assert qwen.metadata == {"family": "qwen", "ctx": 8192, "released": "2024-09-19"}
    assert (qwen.pin, qwen.preload) == (False, False)
    assert (embed.backend, embed.model, embed.args) == (
        "llama-server",
        models / "embed.gguf",
        ("--embeddings",),
    )
    assert (embed.ttl, embed.health, embed.unlisted) == (0, "/v1/models", True)
    assert (embed.pin, embed.preload) == (True, True)  # the persistent group, the hook
    assert (vl.backend, vl.model, vl.args) == (
        "vllm",
        models / "vl-model",
        ("--max-model-len", "4096"),
    )
    assert (vl.ttl, vl.stop_timeout) == (600, 30)  # globalTTL; the model's own macro wins
    assert (sd.backend, sd.health) == ("command", None)  # checkEndpoint: none
    assert sd.cmd[:6] == ("docker", "run", "--rm", "--init", "--name", "sd")
    assert "${PORT}:8080" in sd.cmd
    assert f"{models}:/models" in sd.cmd


def test_each_setting_left_behind_is_named_at_its_line(tmp_path: Path, models: Path) -> None:
    """Notes go to stderr as config.yaml:LINE: KEY: why, in the order of the file."""
    del models
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    done = _import(config, tmp_path / "swapd")
    assert done.returncode == 0, done.stderr
    notes = done.stderr.splitlines()
    expected = {
        "startPort": _line_of(CONFIG, "startPort:"),
        "sendLoadingState": _line_of(CONFIG, "sendLoadingState:"),
        "peers": _line_of(CONFIG, "peers:"),
        "models.sd.cmdStop": _line_of(CONFIG, "cmdStop:"),
        "models.qwen.cmd": _line_of(CONFIG, "cmd: |"),
        "models.qwen.env": _line_of(CONFIG, "env: ["),
        "models.qwen.filters.setParams": _line_of(CONFIG, "filters:"),
        "models.qwen.concurrencyLimit": _line_of(CONFIG, "concurrencyLimit:"),
        "groups.big": _line_of(CONFIG, "big:"),
        "groups.always": _line_of(CONFIG, "always:"),
        "apiKeys": _line_of(CONFIG, "apiKeys:"),
    }
    for key, line in expected.items():
        prefix = f"{config}:{line}: {key}: "
        assert any(note.startswith(prefix) for note in notes), (prefix, done.stderr)
    lines = [int(n.split(":")[1]) for n in notes if n.startswith(f"{config}:")]
    assert lines == sorted(lines)
    assert "--api-key" in next(n for n in notes if ": models.qwen.cmd: " in n)
    assert any(
        ": models.qwen.env: ECHO_PORT: swapd replaces ${PORT} in cmd only" in n for n in notes
    )
    assert not any(": models.qwen.proxy" in n or ": models.sd.proxy" in n for n in notes)


def test_a_command_swapd_cannot_start_is_kept_aside(tmp_path: Path) -> None:
    """No ${PORT} (a fixed port behind proxy:): written as .yaml.disabled, check still passes."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n"
        "  fixed:\n"
        "    cmd: python3 -m http.server 9000\n"
        "    proxy: http://127.0.0.1:9000\n"
        "  hub:\n"
        "    cmd: vllm serve Qwen/Qwen3-8B --port ${PORT}\n"
        "  pulled:\n"
        "    cmd: llama-server -hf ggml-org/gemma-3-1b-it-GGUF --port ${PORT}\n"
        "    ttl: 60\n"
        "    futureKey: 1\n"
    )
    out = tmp_path / "out"
    done = _import(config, out)
    assert done.returncode == 0, done.stderr
    assert (out / "presets" / "fixed.yaml.disabled").exists()
    assert "${PORT}" in (out / "presets" / "fixed.yaml.disabled").read_text()
    assert f"{config}:4: models.fixed.proxy: not carried" in done.stderr
    assert f"{config}:10: models.pulled.futureKey: " in done.stderr
    assert "kept aside (.disabled): fixed" in done.stdout
    checked = swapd("check", "--config", str(out / "swapd.yaml"))
    assert checked.returncode == 0, checked.stderr
    loaded = load_config(out / "swapd.yaml")
    assert [p.name for p in loaded.presets] == ["hub", "pulled"]
    hub, pulled = loaded.presets
    assert (hub.backend, hub.cmd[:3]) == ("command", ("vllm", "serve", "Qwen/Qwen3-8B"))
    assert (pulled.backend, pulled.ttl) == ("command", 60)


def test_a_model_id_with_a_slash_gets_a_file_name_and_keeps_its_name(tmp_path: Path) -> None:
    """``org/model`` is a usable swapd name but no file name: name: keeps it."""
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  org/m:\n    cmd: ./serve --port ${PORT}\n")
    out = tmp_path / "out"
    assert _import(config, out).returncode == 0
    loaded = load_config(out / "swapd.yaml")
    assert [(p.name, Path(p.file).name) for p in loaded.presets] == [("org/m", "org_m.yaml")]


def test_an_out_that_holds_files_needs_force(tmp_path: Path, models: Path) -> None:
    """Without --force: exit 1, nothing touched; with it, this import's files are replaced."""
    del models
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    assert _import(config, out).returncode == 0
    mine = out / "presets" / "mine.yaml"
    mine.write_text("backend: command\ncmd: [x, '${PORT}']\n")
    config.write_text(CONFIG.replace("  sd:\n", "  sd2:\n"))
    refused = _import(config, out)
    assert refused.returncode == 1
    assert "already holds files; --force" in refused.stderr
    assert (out / "presets" / "sd.yaml").exists()
    forced = _import(config, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (out / "presets" / "sd.yaml").exists()  # written by the earlier import
    assert (out / "presets" / "sd2.yaml").exists()
    assert mine.exists()  # the user's own
    assert f"warning: {mine}: not written by this import" in forced.stderr


def test_an_out_that_cannot_be_written_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """DIR is a file: the reason, no traceback."""
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  a:\n    cmd: ./serve --port ${PORT}\n")
    (tmp_path / "out").write_text("")
    done = _import(config, tmp_path / "out")
    assert done.returncode == 1
    assert done.stderr.startswith("swapd: cannot write "), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models:\n  a: [unclosed\n", ":3:1: (yaml): "),
        ("- a list\n", ":1:1: (top level): "),
        ("models:\n  a:\n    cmd: x\n    cmd: y\n", ":4:5: cmd: key is given twice"),
    ],
)
def test_a_config_that_cannot_be_read_exits_1_at_its_line(
    tmp_path: Path, text: str, where: str
) -> None:
    """Not YAML, not a mapping, a key twice: file:line:column and exit 1, nothing written."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    done = _import(config, tmp_path / "out")
    assert done.returncode == 1
    assert done.stderr.startswith(f"{config}{where}"), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("cmd", "argv"),
    [
        ("a b", ["a", "b"]),
        ("a \\\n  b\n  # a comment\n  c", ["a", "b", "c"]),
        ("sh -c 'x --port ${PORT} && y'", ["sh", "-c", "x --port ${PORT} && y"]),
        ('a "b c"\\\n d', ["a", "b c", "d"]),
    ],
)
def test_cmd_is_split_as_llama_swap_splits_it(cmd: str, argv: list[str]) -> None:
    """Comment lines dropped, backslash lines joined, then POSIX shell words."""
    assert command.split(cmd) == argv


@pytest.mark.parametrize(
    ("cmd", "argv"),
    [
        ('sh -c "exec srv -c \\$CTX"', ["sh", "-c", "exec srv -c $CTX"]),
        ('sh -c "echo \\`date\\` \\q"', ["sh", "-c", "echo `date` \\q"]),
        ("sh -c 'echo \\$HOME'", ["sh", "-c", "echo \\$HOME"]),
    ],
)
def test_a_backslash_in_double_quotes_escapes_as_a_shells_does(cmd: str, argv: list[str]) -> None:
    r"""``\$`` inside double quotes is ``$``: ``sh -c`` then expands the variable.

    Kept as ``\$``, the inner shell would pass the text ``$CTX`` to the server.
    """
    assert command.split(cmd) == argv


def test_macros_nest_override_and_keep_their_type() -> None:
    """A model's macro wins, macros use macros, a whole-value macro keeps its type."""
    scope = macros.scope({"a": "${b}-x", "b": 1, "n": 5}, {"b": 2}, "m1")
    assert (
        macros.expand("${a} ${MODEL_ID} ${PORT} ${env.HOME}", scope) == "2-x m1 ${PORT} ${env.HOME}"
    )
    assert macros.expand({"k": "${n}"}, scope) == {"k": 5}
    assert macros.unknown(["${nope}", "${PORT}"]) == ["nope"]


def test_a_macro_that_grows_without_end_stops_at_its_limit() -> None:
    """One that uses itself, and a chain that doubles 40 times (a trillion bytes), stop soon."""
    assert macros.unknown(macros.expand("${a}", {"a": "x${a}"})) == ["a"]
    chain = {f"m{i}": f"${{m{i + 1}}}${{m{i + 1}}}" for i in range(40)} | {"m40": "x"}
    grown = macros.expand("${m0}", chain)
    assert isinstance(grown, str)
    assert len(grown) <= macros.EXPANDED_LIMIT


@pytest.mark.parametrize("members", ["5", "qwen", "{a: 1}", "true"])
def test_group_members_that_are_no_list_are_a_note_not_a_traceback(
    tmp_path: Path, members: str
) -> None:
    """``members: 5`` (or a bare name): noted at its group's line, the import goes on."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n  qwen:\n    cmd: llama-server --port ${PORT} -m /m/q.gguf\n"
        f"groups:\n  g:\n    persistent: true\n    members: {members}\n"
    )
    done = _import(config, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"{config}:5: groups.g: members: expected a list of model ids" in done.stderr


def test_an_alias_that_names_another_model_is_dropped_so_swapd_check_accepts(
    tmp_path: Path,
) -> None:
    """llama-swap sends a model id to that model, alias or not; a name twice is noted.

    Written as is, swapd refuses the whole layout: no model would start.
    """
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF")
    cmd = f"llama-server --port ${{PORT}} -m {gguf}"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"models:\n  a:\n    cmd: {cmd}\n    aliases: [b, shared]\n"
        f"  b:\n    cmd: {cmd}\n  c:\n    cmd: {cmd}\n    aliases: [shared]\n"
    )
    out = tmp_path / "out"
    done = _import(config, out)
    assert done.returncode == 0, done.stderr
    checked = swapd("check", "--config", str(out / "swapd.yaml"))
    assert checked.returncode == 0, checked.stderr
    loaded = load_config(out / "swapd.yaml")
    assert _preset(loaded, "a").aliases == ("shared",)
    assert _preset(loaded, "c").aliases == ()
    assert f"{config}:4: models.a.aliases: b is the id of model b" in done.stderr
    assert f"{config}:9: models.c.aliases: shared is already an alias of a" in done.stderr
