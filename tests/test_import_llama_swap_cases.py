"""``swapd import-llama-swap``: llama-swap's own reading of config.yaml, case by case."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from test_cli import swapd

from swapd.backends import Placement, build_launch
from swapd.config import Config, load_config
from swapd.llama_swap import importer, layout
from swapd.presets import Preset


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """A model file the configs' commands name."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def _imported(tmp_path: Path, text: str) -> tuple[Config, str]:
    """The layout ``text`` imports to, as swapd loads it, and the notes printed."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    found = importer.read(config)
    out = tmp_path / "out"
    layout.write(found, out, config)
    notes = "\n".join(note.render(str(config)) for note in found.all_notes())
    return load_config(out / "swapd.yaml"), notes


def _preset(config: Config, name: str) -> Preset:
    preset = config.preset(name)
    assert preset is not None, name
    return preset


def test_a_comment_line_is_dropped_before_its_macros_are_expanded(
    tmp_path: Path, gguf: Path
) -> None:
    """A folded macro ends in a newline: expanded first, it would cut its comment in two.

    llama-swap drops comment lines from the cmd as written, so a macro only used in
    one is no macro left unexpanded either (cmdStop alike).
    """
    config, notes = _imported(
        tmp_path,
        "macros:\n"
        "  llama: >\n"
        "    /usr/local/bin/llama-server --port ${PORT}\n"
        "models:\n"
        "  qwen:\n"
        "    cmd: |\n"
        "      # ${llama} with an old model\n"
        "      ${llama}\n"
        f"      -m {gguf}\n"
        "      # --draft ${draft_model}\n"
        "    cmdStop: |\n"
        "      # kill ${gone}\n"
        "      kill ${PID}\n",
    )
    qwen = _preset(config, "qwen")
    assert (qwen.backend, qwen.binary, qwen.args) == (
        "llama-server",
        "/usr/local/bin/llama-server",
        (),
    )
    assert "is no macro" not in notes


def test_an_empty_env_value_is_written_as_swapd_reads_it(tmp_path: Path, gguf: Path) -> None:
    """``CUDA_VISIBLE_DEVICES=`` hides every card: it stays set, to nothing."""
    config, _ = _imported(
        tmp_path,
        "models:\n  a:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        '    env: ["CUDA_VISIBLE_DEVICES=", "X=a=b"]\n',
    )
    assert _preset(config, "a").env == {"CUDA_VISIBLE_DEVICES": "", "X": "a=b"}


def test_a_gpu_picked_in_env_is_carried_as_devices(tmp_path: Path, gguf: Path) -> None:
    """``CUDA_VISIBLE_DEVICES=1`` pins the model: swapd reads that as ``devices: [1]``.

    swapd sets the variable itself to the GPU it places the model on; kept in ``env``,
    it said nothing (and before, it ran the model where swapd counted nothing of it).
    """
    config, notes = _imported(
        tmp_path,
        "models:\n  a:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        '    env: ["CUDA_VISIBLE_DEVICES=1,2", "X=y"]\n'
        "  b:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        '    env: ["CUDA_VISIBLE_DEVICES=GPU-5f1e"]\n'
        "  c:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        '    env: ["CUDA_VISIBLE_DEVICES=\u00b2"]\n',
    )
    a, b = _preset(config, "a"), _preset(config, "b")
    assert (a.devices, a.env) == ((1, 2), {"X": "y"})
    assert (b.devices, b.env) == (None, {})
    assert "CUDA_VISIBLE_DEVICES=1,2 is carried as devices: [1, 2]" in notes
    assert "CUDA_VISIBLE_DEVICES=GPU-5f1e dropped" in notes
    assert _preset(config, "c").devices is None  # a digit to Python, not to int()


@pytest.mark.parametrize("own", ["swapd.yaml", "presets/a.yaml"])
def test_force_never_overwrites_a_file_the_import_did_not_write(tmp_path: Path, own: str) -> None:
    """A hand-written swapd.yaml or preset at a path the import writes: exit 1, named, kept."""
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  a:\n    cmd: ./serve --port ${PORT}\n")
    out = tmp_path / "out"
    (out / "presets").mkdir(parents=True)
    mine = out / own
    mine.write_text("# my own\n")
    done = swapd("import-llama-swap", str(config), "--out", str(out), "--force")
    assert done.returncode == 1
    assert str(mine) in done.stderr
    assert "not written by swapd import-llama-swap" in done.stderr
    assert mine.read_text() == "# my own\n"
    assert [p.name for p in (out / "presets").iterdir()] == ([mine.name] if "/" in own else [])


def test_a_key_set_beside_a_merge_key_wins_as_in_llama_swap(tmp_path: Path, gguf: Path) -> None:
    """``<<: *base`` then ``ttl: 30``: the model's own ttl, not "key is given twice"."""
    config, _ = _imported(
        tmp_path,
        "defs:\n  base: &base\n    ttl: 600\n    env: [A=1]\n"
        "models:\n"
        f"  a:\n    <<: *base\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        f"  b:\n    <<: *base\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n    ttl: 30\n",
    )
    a, b = _preset(config, "a"), _preset(config, "b")
    assert (a.ttl, b.ttl) == (600, 30)
    assert a.env == b.env == {"A": "1"}


def test_a_vllm_model_serves_the_name_use_model_name_sends(tmp_path: Path) -> None:
    """useModelName rewrites each request's model: vLLM must serve that name, not swapd's."""
    vllm = tmp_path / "bin" / "vllm"
    vllm.parent.mkdir()
    vllm.write_text("#!/bin/sh\n")
    vllm.chmod(0o755)
    (tmp_path / "qwen-vl").mkdir()
    config, _ = _imported(
        tmp_path,
        "models:\n  qwen:\n"
        f"    cmd: {vllm} serve {tmp_path / 'qwen-vl'} --port ${{PORT}}\n"
        "    useModelName: Qwen/Qwen2.5-VL\n"
        f"  named:\n    cmd: {vllm} serve {tmp_path / 'qwen-vl'} --served-model-name x\n"
        "    useModelName: x\n",
    )
    argv = build_launch(_preset(config, "qwen"), 7, Placement()).argv
    served = argv.index("--served-model-name")
    assert argv[served + 1 :].count("--served-model-name") == 0
    assert argv[served + 1] == "Qwen/Qwen2.5-VL"
    assert argv[served + 2].startswith("-")
    assert _preset(config, "named").args == ("--served-model-name", "x")


def test_unload_timeout_0_takes_the_global_one(tmp_path: Path, gguf: Path) -> None:
    """A model's ``unloadTimeout: 0`` is llama-swap's default: the global unloadTimeout."""
    config, _ = _imported(
        tmp_path,
        "unloadTimeout: 45\nmodels:\n"
        f"  a:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n    unloadTimeout: 0\n"
        f"  b:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n    unloadTimeout: 5\n",
    )
    assert (_preset(config, "a").stop_timeout, _preset(config, "b").stop_timeout) == (45, 5)


def test_set_params_by_id_keys_keep_routing_as_aliases(tmp_path: Path, gguf: Path) -> None:
    """llama-swap makes each setParamsByID key an alias: the ids still reach the model.

    Their parameters are dropped, with a note naming the ids; a key that is the model's
    id, an alias already, or another model's id adds nothing.
    """
    config, notes = _imported(
        tmp_path,
        "models:\n"
        f"  qwen3:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        "    aliases: [q3]\n"
        "    filters:\n      setParamsByID:\n"
        "        ${MODEL_ID}:think: {chat_template_kwargs: {enable_thinking: true}}\n"
        "        qwen3: {temperature: 1}\n"
        "        q3: {temperature: 1}\n"
        "        other: {temperature: 1}\n"
        f"  other:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n",
    )
    assert _preset(config, "qwen3").aliases == ("q3", "qwen3:think")
    why = next(line for line in notes.splitlines() if ".filters.setParamsByID: " in line)
    assert "qwen3:think" in why
    assert "aliases" in why


def test_yaml_1_1_booleans_stay_text_in_macros_and_aliases(tmp_path: Path, gguf: Path) -> None:
    """llama-swap's YAML reads ``on``, ``no``, ``yes``, ``off`` as words, not true and false."""
    config, _ = _imported(
        tmp_path,
        "macros:\n  fa: on\n  mmap: no\nmodels:\n  qwen:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {gguf} --flash-attn ${{fa}} --mmap ${{mmap}}\n"
        "    aliases: [yes, off]\n    unlisted: yes\n",
    )
    qwen = _preset(config, "qwen")
    assert qwen.args == ("--flash-attn", "on", "--mmap", "no")
    assert qwen.aliases == ("yes", "off")
    assert qwen.unlisted  # a bool key reads the old words as llama-swap does


@pytest.mark.parametrize("name", ["llama-server-ec9e0301", "llama-server-cuda"])
def test_a_versioned_llama_server_binary_is_a_llama_server_preset(
    tmp_path: Path, gguf: Path, name: str
) -> None:
    """A build named for its version or flavour is still llama-server: ``binary:`` names it."""
    binary = tmp_path / "bin" / name
    config, notes = _imported(
        tmp_path, f"models:\n  a:\n    cmd: {binary} --port ${{PORT}} -m {gguf} -c 4096\n"
    )
    a = _preset(config, "a")
    assert (a.backend, a.binary, a.model, a.args) == (
        "llama-server",
        str(binary),
        gguf,
        ("-c", "4096"),
    )
    assert f"{name} is read as llama-server" in notes


def test_the_key_flag_a_cmd_gives_is_the_one_noted(tmp_path: Path, gguf: Path) -> None:
    """``--api-key-file`` is dropped under its own name."""
    _, notes = _imported(
        tmp_path,
        f"models:\n  a:\n    cmd: llama-server --port ${{PORT}} -m {gguf} --api-key-file /k\n",
    )
    assert "models.a.cmd: --api-key-file dropped" in notes


@pytest.mark.parametrize(
    ("cmd", "env", "given"),
    [
        ("llama-server -hf org/m-GGUF --port ${PORT} --api-key sk-1", "[]", "--api-key"),
        (
            "env A=1 llama-server -m /m.gguf --port=${PORT} --api-key-file=/k",
            "[]",
            "--api-key-file",
        ),
        ("vllm serve Org/M --port ${PORT}", '["VLLM_API_KEY=sk-1"]', "VLLM_API_KEY"),
    ],
)
def test_a_command_that_gives_its_server_a_key_is_kept_aside(
    tmp_path: Path, cmd: str, env: str, given: str
) -> None:
    """swapd never forwards the client's key (llama-swap did): the server would answer 401."""
    config, notes = _imported(tmp_path, f"models:\n  a:\n    cmd: {cmd}\n    env: {env}\n")
    assert config.presets == ()
    assert (tmp_path / "out" / "presets" / "a.yaml.disabled").exists()
    assert f"gives the server a key ({given}) that swapd never sends" in notes


@pytest.mark.parametrize(
    ("swap", "noted"), [("", True), ("swap: true, ", True), ("swap: no, ", False)]
)
def test_a_persistent_group_that_swaps_says_its_pinned_members_no_longer_do(
    tmp_path: Path, gguf: Path, swap: str, noted: bool
) -> None:
    """llama-swap stopped one member to load another (swap: true by default); pinned, none is."""
    cmd = f"llama-server --port ${{PORT}} -m {gguf}"
    config, notes = _imported(
        tmp_path,
        f"models:\n  a:\n    cmd: {cmd}\n  b:\n    cmd: {cmd}\n"
        f"groups:\n  keep: {{persistent: true, {swap}members: [a, b]}}\n",
    )
    assert (_preset(config, "a").pin, _preset(config, "b").pin) == (True, True)
    assert ("groups.keep: swap: true (the default) not carried" in notes) == noted


@pytest.mark.parametrize("model", ["-m ''", "-m"])
def test_a_model_flag_without_a_path_runs_as_written(tmp_path: Path, model: str) -> None:
    """``-m ''`` or ``-m`` last names no model, not config.yaml's folder: a command as written.

    swapd refuses an empty argument in a command, so ``-m ''`` is kept aside.
    """
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  a:\n    cmd: llama-server --port ${{PORT}} {model}\n")
    (draft,) = importer.read(config).drafts
    assert (draft.values["backend"], "model" in draft.values) == ("command", False)
    assert any("-m/--model names no model file" in note.why for note in draft.notes)
    assert (draft.refused is not None) == (model == "-m ''")


def test_strip_params_as_a_list_or_twice_is_read_once_each(tmp_path: Path, gguf: Path) -> None:
    """``stripParams: [a, b]`` are names, not the text of a list; each is stripped once."""
    config, _ = _imported(
        tmp_path,
        "models:\n"
        f"  a:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        "    filters: {stripParams: [top_k, top_p, top_k]}\n"
        f"  b:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        '    filters: {stripParams: "temperature, top_k, temperature"}\n',
    )
    strip = [_preset(config, name).filters for name in ("a", "b")]
    assert [f.strip if f else None for f in strip] == [("top_k", "top_p"), ("temperature", "top_k")]


def test_one_api_key_given_as_text_is_carried(tmp_path: Path) -> None:
    """``apiKeys: sk-single`` is one key: dropped, it would leave swapd open to anyone."""
    config, notes = _imported(
        tmp_path, "apiKeys: sk-single-0123456789\nmodels:\n  a:\n    cmd: ./s --port ${PORT}\n"
    )
    assert config.api_keys == ("sk-single-0123456789",)
    assert (tmp_path / "out" / "swapd.yaml").stat().st_mode & 0o777 == stat.S_IRUSR | stat.S_IWUSR
    assert "apiKeys: expected a list of keys" in notes


def test_api_keys_that_all_read_the_environment_leave_swapd_open_and_say_so(
    tmp_path: Path,
) -> None:
    """Each ``${env.KEY}`` is dropped: with none left, swapd asks no client for a key."""
    config, notes = _imported(
        tmp_path,
        'apiKeys: ["${env.API_KEY_1}", "${env.API_KEY_2}"]\n'
        "models:\n  a:\n    cmd: ./s --port ${PORT}\n",
    )
    assert config.api_keys == ()
    assert "apiKeys: no key carried: swapd serves every client without a key" in notes


def test_a_port_macro_left_in_a_served_models_args_is_noted(tmp_path: Path, gguf: Path) -> None:
    """llama-swap put the port in all of cmd; swapd fills in only its own --port."""
    config, notes = _imported(
        tmp_path,
        "models:\n  a:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {gguf} --slot-save-path /s/${{PORT}}\n",
    )
    assert _preset(config, "a").args == ("--slot-save-path", "/s/${PORT}")
    assert "models.a.cmd: /s/${PORT}: swapd replaces ${PORT} in a command's cmd only" in notes


def test_a_check_endpoint_left_empty_keeps_the_default_health_path(tmp_path: Path) -> None:
    """``checkEndpoint:`` with no value is null, and llama-swap keeps /health: not ``none``."""
    config, _ = _imported(
        tmp_path, "models:\n  a:\n    cmd: ./s --port ${PORT}\n    checkEndpoint:\n"
    )
    assert _preset(config, "a").health == "/health"


def test_values_of_the_wrong_type_are_noted_or_read_as_llama_swap_reads_them(
    tmp_path: Path, gguf: Path
) -> None:
    """A number in a text key is its text; a quoted number or bool where one is due is noted."""
    config, notes = _imported(
        tmp_path,
        "models:\n"
        f"  a:\n    cmd: llama-server --port ${{PORT}} -m {gguf}\n"
        '    useModelName: 7\n    unlisted: "true"\n    concurrencyLimit: "4"\n',
    )
    a = _preset(config, "a")
    assert (a.use_model_name, a.unlisted, a.concurrency) == ("7", False, None)
    assert "models.a.unlisted: expected true or false" in notes
    assert "models.a.concurrencyLimit: expected a whole number" in notes
