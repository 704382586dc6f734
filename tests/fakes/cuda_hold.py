"""Hold real VRAM through the CUDA driver API (``libcuda.so``): no toolkit, no PyTorch.

Used by the fake upstream's ``--cuda-bytes`` (a backend that holds real device
memory while it runs) and, run as a script, as a process outside swapd that
holds memory on the GPU:

    python tests/fakes/cuda_hold.py BYTES [DEVICE]    # prints "held", then waits

It also reads NVML as the GPU tests and ``scripts/bench_gpu.py`` check swapd against it.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from typing import Any


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


def _check(result: int, call: str) -> None:
    if result != 0:
        raise CudaError(f"{call} failed with CUresult {result}")


def hold_vram(nbytes: int, device: int = 0) -> tuple[ctypes.CDLL, ctypes.c_void_p]:
    """Create a context on ``device`` and allocate ``nbytes`` there; keep the result alive."""
    cuda = ctypes.CDLL("libcuda.so.1")
    _check(cuda.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    _check(cuda.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
    context = ctypes.c_void_p()
    _check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, handle), "cuCtxCreate_v2")
    pointer = ctypes.c_uint64()
    _check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(nbytes)), "cuMemAlloc_v2")
    # Touch it, so the memory is committed, not only reserved.
    _check(cuda.cuMemsetD8_v2(pointer, 0, ctypes.c_size_t(nbytes)), "cuMemsetD8_v2")
    return cuda, context


def nvml_used_by(pynvml: Any, pid: int) -> int:
    """What NVML's process list says ``pid`` uses on GPU 0 (0 when it is not listed)."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid:
            return int(proc.usedGpuMemory or 0)
    return 0


def nvml_free(pynvml: Any) -> int:
    """Free memory on GPU 0 as NVML reports it."""
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)


def main() -> None:
    """Hold the bytes until SIGTERM."""
    nbytes = int(sys.argv[1])
    device = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    held = hold_vram(nbytes, device)
    print("held", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del held


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
