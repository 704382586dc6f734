"""llama-server's own spellings of its flags: LLAMA_ARG_* variables and ``--flag_name``.

llama-server reads its variables before its command line, and takes ``_`` for ``-`` in a
long flag. swapd's estimate and its pinned ``-c 0`` / ``-ngl`` read them as it does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import StartDaemon

from swapd.backends import Placement
from swapd.backends.llama_server import LLAMA_SERVER
from swapd.presets import Preset
from swapd.probe import HOST_DEVICE

MIB = 1024**2


def _need(model: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> int:
    preset = Preset(
        name="m", file="m.yaml", backend="llama-server", model=model, args=args, env=env or {}
    )
    need = LLAMA_SERVER.estimate(preset, HOST_DEVICE, 64 * 1024**3)
    assert need is not None
    return need


def test_llama_arg_variables_count_in_the_estimate(gemma: Path) -> None:
    """``LLAMA_ARG_SWA_FULL=1`` is ``--swa-full``: Gemma 3's sliding layers hold the whole context.

    Gemma 3 270M at its 32k context: 576 MiB of KV cache with it, 134 MiB without. The
    estimate read the flags only, so a preset that set it by variable was admitted for
    less than a quarter of its cache.
    """
    plain = _need(gemma)
    by_flag = _need(gemma, ("--swa-full",))
    assert by_flag > plain + 400 * MIB
    assert _need(gemma, env={"LLAMA_ARG_SWA_FULL": "1"}) == by_flag
    assert _need(gemma, env={"LLAMA_ARG_UBATCH": "4096"}) == _need(gemma, ("-ub", "4096"))
    # The command line wins over the variable, as in llama-server.
    assert _need(gemma, ("-c", "4096"), {"LLAMA_ARG_CTX_SIZE": "32768"}) == _need(
        gemma, ("-c", "4096")
    )


def test_underscored_flags_count_in_the_estimate(gemma: Path) -> None:
    """``--swa_full`` and ``--ubatch_size`` are the flags llama-server reads them as."""
    assert _need(gemma, ("--swa_full",)) == _need(gemma, ("--swa-full",))
    assert _need(gemma, ("--ubatch_size", "4096")) == _need(gemma, ("-ub", "4096"))


@pytest.mark.parametrize(
    ("args", "env", "absent"),
    [
        ((), {"LLAMA_ARG_CTX_SIZE": "4096"}, "-c"),
        (("--ctx_size", "4096"), {}, "-c"),
        ((), {"LLAMA_ARG_N_GPU_LAYERS": "10"}, "-ngl"),
        (("--n_gpu_layers", "10"), {}, "-ngl"),
    ],
)
def test_no_pin_over_a_setting_given_another_way(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], absent: str
) -> None:
    """swapd pins ``-c 0`` and ``-ngl`` only where neither a variable nor a flag sets them.

    A pinned flag comes later on the command line and wins: the preset's context or
    layers were silently replaced.
    """
    preset = Preset(
        name="m",
        file="m.yaml",
        backend="llama-server",
        model=tmp_path / "m.gguf",
        args=args,
        env=env,
    )
    argv = LLAMA_SERVER.argv(preset, "/bin/true", 1, Placement(on_gpu=True))
    assert absent not in argv[3 + len(args) :], argv


@pytest.mark.llama
def test_the_context_a_variable_sets_is_the_one_served(
    start_daemon: StartDaemon, tiny_gguf: Path
) -> None:
    """A real llama-server run by swapd with ``LLAMA_ARG_CTX_SIZE=256`` serves 256, not 512."""
    preset = {
        "backend": "llama-server",
        "model": str(tiny_gguf),
        "env": {"LLAMA_ARG_CTX_SIZE": "256"},
    }
    d = start_daemon({"tiny": preset})
    status, body = d.get("/upstream/tiny/props")
    assert status == 200, body
    assert body["default_generation_settings"]["n_ctx"] == 256
