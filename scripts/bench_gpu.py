"""Admission against real VRAM on an NVIDIA GPU: probe cost, footprints, eviction, outside use.

Backends are the fake upstream holding real device memory through the CUDA
driver API (``--cuda-bytes``: a context and an allocation, no toolkit); swapd's
probe, admission and footprint measurement are the real ones, read through NVML.

* ``card``: the GPU, its driver and NVML, and what one CUDA context costs on it
  (a holder of N bytes as NVML lists it, minus N);
* ``probe``: one read of swapd's NVML probe (device totals plus the process
  list), median and p99 over ``--reads``, with no holder and with 8 holders alive;
* ``start``: the fake upstream started directly until it answers a first
  completion, against the same model's first request through swapd (start,
  admission and the answer), ``--rounds`` times each, interleaved; the ratio is
  swapd's;
* ``lru``: three models of ``--hold`` bytes under a budget that fits two; the
  requests a, b, a, c; per step the time to answer and swapd's measured footprint
  against NVML's figure for the same pid; the victims (b, or the run fails);
* ``outside``: a process outside swapd takes all but 1 GiB; a request for a model
  that needs more gets 503 at once; once the process exits, the same request loads;
* ``llama`` (with ``--llama-server``, a CUDA build): a random-weight llama GGUF of
  about 1.2 GB all on the GPU (``-ngl 99``). llama-server started directly until it
  answers a first completion, against the same first request through swapd,
  ``--rounds`` times each, interleaved; swapd's estimate and measured footprint
  against NVML's figure; then, under a budget of 1.5 footprints, a second preset
  of the same file evicts the first (the swap's time against a direct start);
* ``estimate`` (with ``--llama-server``): random-weight GGUFs whose heads CUDA's
  flash attention takes (64, 128 wide) and does not (16), with "-fa auto", "-fa off",
  a quantized model and a partial offload. For each, swapd's estimate (and the one
  that took "auto" for on, as swapd did before) against llama-server's own buffer
  sizes (``-v`` log: model, KV, compute on CUDA0) and NVML's figure for the pid at
  /health and after a first completion; the rest is the runtime's own (context,
  kernels, cuBLAS) that ``GPU_OVERHEAD`` stands for.

    python scripts/bench_gpu.py [--hold 2GiB] [--rounds 5] [--llama-server PATH] [--out report.json]
    python scripts/bench_gpu.py --estimate-only --llama-server PATH     # card and estimate only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import _bench
from _bench import Json, Swapd
from fakes.cuda_hold import nvml_free, nvml_used_by  # tests/ is on the path via _bench

from swapd.estimate import MIB as _MIB
from swapd.estimate import estimate_for_args, parse_llama_args
from swapd.probe import open_probe

GIB = 1024**3
MIB = 1024**2
CUDA_HOLD = _bench.REPO / "tests" / "fakes" / "cuda_hold.py"
CHAT = "/v1/chat/completions"


def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


@contextlib.contextmanager
def holders(count: int, nbytes: int) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` processes outside swapd, each holding ``nbytes`` of VRAM until the block ends."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(CUDA_HOLD), str(nbytes)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            if proc.stdout is None or proc.stdout.readline().strip() != "held":
                raise RuntimeError("a VRAM holder failed to start")
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def card(nvml: Any) -> Json:
    """The GPU and what one CUDA context costs beside its allocation."""
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    held = 256 * MIB
    with holders(1, held) as (proc,):
        listed = nvml_used_by(nvml, proc.pid)
    return {
        "name": str(nvml.nvmlDeviceGetName(handle)),
        "driver": str(nvml.nvmlSystemGetDriverVersion()),
        "nvml": str(nvml.nvmlSystemGetNVMLVersion()),
        "total_gib": round(nvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 1),
        "context_mib": round((listed - held) / MIB, 1),
    }


def probe_cost(reads: int) -> Json:
    """Median and p99 of one probe read, with no holder and with 8 holders alive."""
    probe, warnings = open_probe("auto")
    try:
        if not probe.devices or probe.devices[0].kind != "nvidia":
            raise RuntimeError(f"swapd's probe found no NVIDIA GPU: {warnings}")
        result: Json = {}
        for count in (0, 8):
            with holders(count, 256 * MIB) as procs:
                pids = [p.pid for p in procs]
                times = []
                for _ in range(reads):
                    began = time.perf_counter()
                    readings = probe.read(pids)
                    times.append((time.perf_counter() - began) * 1000)
                seen = sum(1 for pid in pids if readings[0].by_pid.get(pid))
            result[f"holders_{count}"] = {
                "ms": _bench.summarize(times),
                "holders_seen": seen,
                "source": readings[0].source,
            }
        return result
    finally:
        probe.close()


def _preset(name: str, hold: int) -> Json:
    cmd = _bench.fake_cmd(name.upper(), "--cuda-bytes", str(hold))
    return {"backend": "command", "cmd": cmd, "memory": hold, "devices": [0]}


def _answer(swapd: Swapd, model: str) -> tuple[int, Any, float]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    began = time.perf_counter()
    status, answer = _bench.http_json("POST", swapd.port, CHAT, body)
    return status, answer, (time.perf_counter() - began) * 1000


def _first_answer(port: int) -> None:
    """The same one-token completion a request through swapd asks, sent directly."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    status, answer = _bench.http_json("POST", port, CHAT, body)
    if status != 200:
        raise RuntimeError(f"direct backend: {status} {answer}")


def _healthy(port: int) -> bool:
    return _bench.http_status(port, "/health") == 200


def _measured(swapd: Swapd, name: str) -> bool:
    return swapd.model(name)["memory"]["measured"] is not None


def start_cost(hold: int, rounds: int) -> Json:
    """The fake upstream started directly against its first request through swapd."""
    direct, through = [], []
    swapd = Swapd({"a": _preset("a", hold)}, {"devices": [0], "reserve": 0}).start()
    try:
        for _ in range(rounds):
            port = _bench.free_port()
            began = time.perf_counter()
            cmd = [str(port) if a == "${PORT}" else a for a in _preset("a", hold)["cmd"]]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            try:
                _bench.wait_until(partial(_healthy, port), 60)
                _first_answer(port)
                direct.append((time.perf_counter() - began) * 1000)
            finally:
                _bench.stop_process(proc)
            status, answer, ms = _answer(swapd, "a")
            if status != 200:
                raise RuntimeError(f"a through swapd: {status} {answer}")
            through.append(ms)
            _bench.http_json("POST", swapd.port, "/swapd/models/a/unload")
            _bench.wait_until(lambda: swapd.model("a")["state"] == "stopped", 60)
    finally:
        swapd.stop()
    d, t = _bench.summarize(direct), _bench.summarize(through)
    return {"direct_ms": d, "swapd_ms": t, "ratio_p50": t["p50"] / d["p50"]}


def lru(nvml: Any, hold: int) -> Json:
    """a, b, a, c with room for two: per step the time, the footprints and the victims."""
    presets = {n: _preset(n, hold) for n in ("a", "b", "c")}
    budget = 3 * hold + hold // 4  # two fit with contexts up to 0.625 hold; three do not past 0.125
    swapd = Swapd(presets, {"devices": [0], "budget": budget, "reserve": 0}).start()
    steps = []
    try:
        for name in ("a", "b", "a", "c"):
            status, answer, ms = _answer(swapd, name)
            if status != 200:
                raise RuntimeError(f"{name}: {status} {answer}")
            _bench.wait_until(partial(_measured, swapd, name), 30)
            entry = swapd.model(name)
            steps.append(
                {
                    "model": name,
                    "answer_ms": round(ms, 1),
                    "measured_mib": round(entry["memory"]["measured"] / MIB, 1),
                    "nvml_mib": round(nvml_used_by(nvml, entry["pid"]) / MIB, 1),
                    "source": entry["memory"].get("source"),
                }
            )
        victims = [e["victims"] for e in swapd.events("model.evict")]
        if victims != [["b"]]:  # too small a context for --hold: all three fitted
            raise RuntimeError(f"expected b to be evicted, not {victims}: lower --hold")
        stopped = {e["model"]: e for e in swapd.events("model.stop")}
        states = {n: swapd.model(n)["state"] for n in presets}
    finally:
        swapd.stop()
    return {
        "budget_mib": budget // MIB,
        "steps": steps,
        "victims": victims,
        "states": states,
        "stops": sorted(stopped),
    }


def outside(nvml: Any, hold: int) -> Json:
    """A process outside swapd holds all but 1 GiB: refused at once, then served once it exits."""
    swapd = Swapd({"a": _preset("a", hold)}, {"devices": [0], "reserve": 0}).start()
    try:
        taken = nvml_free(nvml) - GIB
        with holders(1, taken):
            status, answer, refused_ms = _answer(swapd, "a")
        message = answer["error"]["message"] if status != 200 else None
        _bench.wait_until(lambda: nvml_free(nvml) > hold + GIB, 60)
        after, _, served_ms = _answer(swapd, "a")
    finally:
        swapd.stop()
    return {
        "taken_gib": round(taken / GIB, 1),
        "refused": status,
        "refused_ms": refused_ms,
        "message": message,
        "after": after,
        "served_ms": served_ms,
    }


def _llama_preset(binary: str, model: Path) -> Json:
    args = ["-ngl", "99", "-c", "4096", "--no-warmup"]
    return {
        "backend": "llama-server",
        "binary": binary,
        "model": str(model),
        "args": args,
        "devices": [0],
    }


def _direct_llama(binary: str, model: Path) -> float:
    """One llama-server start on the GPU, from spawn to the answer of a first completion, in ms.

    The same completion as the request through swapd, so the first kernel launches
    (``--no-warmup`` leaves them to it) are paid on both sides.
    """
    port = _bench.free_port()
    argv = [binary, "-m", str(model), "--port", str(port), *_llama_preset(binary, model)["args"]]
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _bench.wait_until(partial(_healthy, port), 120, interval=0.005)
        _first_answer(port)
        return (time.perf_counter() - began) * 1000
    finally:
        _bench.stop_process(proc)


def llama(nvml: Any, binary: str, folder: Path, rounds: int) -> Json:
    """A real llama-server on the GPU: start cost, footprint against NVML, a swap by memory."""
    from fakes.tiny_gguf import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(
        folder / "llama-1g.gguf", n_layers=8, n_embd=2048, n_ctx_train=4096
    )
    _direct_llama(binary, model)  # the first start pays for CUDA's module loading
    direct, through = [], []
    swapd = Swapd({"x": _llama_preset(binary, model)}, {"devices": [0], "reserve": 0}).start()
    try:
        for _ in range(rounds):
            direct.append(_direct_llama(binary, model))
            status, answer, ms = _answer(swapd, "x")
            if status != 200:
                raise RuntimeError(f"x through swapd: {status} {answer}")
            through.append(ms)
            _bench.wait_until(partial(_measured, swapd, "x"), 30)
            entry = swapd.model("x")
            memory = entry["memory"]
            nvml_bytes = nvml_used_by(nvml, entry["pid"])
            _bench.http_json("POST", swapd.port, "/swapd/models/x/unload")
            _bench.wait_until(lambda: swapd.model("x")["state"] == "stopped", 60)
    finally:
        swapd.stop()
    footprint = {
        "file_mib": round(model.stat().st_size / MIB, 1),
        "estimate_mib": round((memory["estimate"] or 0) / MIB, 1),
        "measured_mib": round(memory["measured"] / MIB, 1),
        "nvml_mib": round(nvml_bytes / MIB, 1),
        "source": memory["source"],
    }
    d, t = _bench.summarize(direct), _bench.summarize(through)
    # Room for one (counted as the larger of its estimate and measure), not for two.
    budget = int(max(memory["measured"], memory["estimate"] or 0) * 1.5)
    presets = {n: _llama_preset(binary, model) for n in ("x", "y")}
    swapd = Swapd(presets, {"devices": [0], "budget": budget, "reserve": 0}).start()
    try:
        first = _answer(swapd, "x")
        if first[0] != 200:
            raise RuntimeError(f"x under the budget: {first[0]} {first[1]}")
        _bench.wait_until(partial(_measured, swapd, "x"), 30)
        swap = _answer(swapd, "y")
        victims = [e["victims"] for e in swapd.events("model.evict")]
        states = {n: swapd.model(n)["state"] for n in presets}
    finally:
        swapd.stop()
    return {
        "footprint": footprint,
        "direct_start_ms": d,
        "swapd_first_request_ms": t,
        "ratio_p50": t["p50"] / d["p50"],
        "swap": {
            "budget_mib": budget // MIB,
            "first": [first[0], round(first[2], 1)],
            "swap": [swap[0], round(swap[2], 1)],
            "victims": victims,
            "states": states,
        },
    }


# (name, model dimensions, llama-server flags beyond -m and --port): heads CUDA's flash
# attention takes and does not, "-fa auto" and "off", quantized weights, a partial offload.
ESTIMATE_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("heads 16, -fa auto", {"n_layers": 4, "n_embd": 1024, "head_dim": 16}, []),
    ("heads 64, -fa auto", {"n_layers": 4, "n_embd": 1024, "head_dim": 64}, []),
    ("heads 64, -fa off", {"n_layers": 4, "n_embd": 1024, "head_dim": 64}, ["-fa", "off"]),
    (
        "heads 128, q8_0, -c 16384",
        {"n_layers": 8, "n_embd": 2048, "head_dim": 128, "q8": True},
        ["-c", "16384"],
    ),
    ("heads 16, -ngl 3 of 5", {"n_layers": 4, "n_embd": 1024, "head_dim": 16}, ["-ngl", "3"]),
    (
        "heads 16, 1.2 GB (the model of 'llama')",
        {"n_layers": 8, "n_embd": 2048, "head_dim": 16},
        [],
    ),
]
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


def device_buffers(log: str) -> dict[str, float]:
    """llama.cpp's own buffer sizes on CUDA0 (MiB), from the last time each was logged.

    A verbose server logs each buffer twice: once for the memory fit's dry run, once for real.
    """
    found: dict[str, float] = {}
    for where, kind, mib in _BUFFER.findall(log):
        if where.startswith("CUDA") and not where.endswith("_Host"):
            found[kind] = float(mib)
    return found


def _flash_attn_line(log: str) -> str:
    lines = [ln for ln in log.splitlines() if "Flash Attention" in ln or "flash_attn" in ln]
    return lines[-1].split(": ", 1)[-1].strip() if lines else "-"


def _estimate_case(nvml: Any, binary: str, model: Path, flags: list[str]) -> Json:
    args = ["-ngl", "99", "-c", "4096", "--no-warmup", *flags]
    parsed = parse_llama_args(args)
    estimate = estimate_for_args(model, parsed)
    # What swapd counted before "auto" followed the GPU's kernels: flash attention on.
    auto_as_on = (
        dataclasses.replace(parsed, flash_attn="on") if parsed.flash_attn == "auto" else parsed
    )
    before = estimate_for_args(model, auto_as_on)
    port = _bench.free_port()
    log_path = model.with_suffix(f".{port}.log")
    with log_path.open("w") as log:
        argv = [binary, "-m", str(model), "--port", str(port), "-v", *args]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _bench.wait_until(partial(_healthy, port), 120, interval=0.02)
        at_health = nvml_used_by(nvml, proc.pid)
        _first_answer(port)
        after = nvml_used_by(nvml, proc.pid)
    finally:
        _bench.stop_process(proc)
    text = log_path.read_text(errors="replace")
    buffers = device_buffers(text)
    return {
        "args": args,
        "file_mib": round(model.stat().st_size / _MIB, 1),
        "estimate": estimate.describe(),
        "estimate_mib": round(estimate.total / _MIB, 1),
        "estimate_before_mib": round(before.total / _MIB, 1),
        "llama_buffers_mib": buffers,
        "flash_attn": _flash_attn_line(text),
        "nvml_at_health_mib": round(at_health / _MIB, 1),
        "nvml_after_answer_mib": round(after / _MIB, 1),
        "rest_mib": round(after / _MIB - sum(buffers.values()), 1),
        "estimate_over_nvml": round(estimate.total / after, 3) if after else None,
        "before_over_nvml": round(before.total / after, 3) if after else None,
    }


def estimates(nvml: Any, binary: str, folder: Path) -> Json:
    """swapd's estimate against llama-server's buffers and NVML, for each of ESTIMATE_CASES."""
    from fakes.tiny_gguf import write_tiny_llama_gguf

    result: Json = {}
    models: dict[str, Path] = {}
    for name, dims, flags in ESTIMATE_CASES:
        key = "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
        if key not in models:
            models[key] = write_tiny_llama_gguf(folder / f"{key}.gguf", n_ctx_train=4096, **dims)
        result[name] = _estimate_case(nvml, binary, models[key], flags)
        print(f"estimate {name}:", result[name], flush=True)
    return result


def main() -> None:
    """Run the sections and print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hold", type=int, default=2 * GIB, help="bytes each model holds")
    parser.add_argument("--rounds", type=int, default=5, help="starts timed each way")
    parser.add_argument("--reads", type=int, default=200, help="probe reads timed")
    parser.add_argument("--llama-server", help="a CUDA build of llama-server: adds 'llama'")
    parser.add_argument("--llama-only", action="store_true", help="only 'card' and 'llama'")
    parser.add_argument("--estimate-only", action="store_true", help="only 'card' and 'estimate'")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    info = _bench.machine_info()
    _bench.print_machine(info)
    nvml = _nvml()
    report: Json = {"machine": info, "card": card(nvml)}
    print("card:", report["card"])
    if args.estimate_only:
        if not args.llama_server:
            parser.error("--estimate-only needs --llama-server")
        with tempfile.TemporaryDirectory(prefix="swapd-gpu-") as folder:
            report["estimate"] = estimates(nvml, args.llama_server, Path(folder))
        _bench.finish_info(info)
        if args.out:
            _bench.write_json(args.out, report)
        return
    if not args.llama_only:
        report["probe"] = probe_cost(args.reads)
        print("probe:", report["probe"])
        report["start"] = start_cost(args.hold, args.rounds)
        print("start:", report["start"])
        report["lru"] = lru(nvml, args.hold)
        print("lru:", report["lru"])
        report["outside"] = outside(nvml, args.hold)
        print("outside:", report["outside"])
    if args.llama_server:
        with tempfile.TemporaryDirectory(prefix="swapd-gpu-") as folder:
            report["llama"] = llama(nvml, args.llama_server, Path(folder), args.rounds)
            print("llama:", report["llama"])
            report["estimate"] = estimates(nvml, args.llama_server, Path(folder))
    _bench.finish_info(info)
    if args.out:
        _bench.write_json(args.out, report)


if __name__ == "__main__":
    main()
