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


class VramHold:
    """A CUDA context on one device and an allocation that can be freed and taken again.

    As vLLM asleep: the context (and what the driver keeps for it) stays with the
    process while the allocation is given back.
    """

    def __init__(self, nbytes: int, device: int = 0) -> None:
        self.nbytes = nbytes
        self.cuda = ctypes.CDLL("libcuda.so.1")
        _check(self.cuda.cuInit(0), "cuInit")
        handle = ctypes.c_int()
        _check(self.cuda.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        _check(self.cuda.cuCtxCreate_v2(ctypes.byref(self.context), 0, handle), "cuCtxCreate_v2")
        self.pointer: ctypes.c_uint64 | None = None

    def take(self) -> None:
        """Allocate and touch ``nbytes`` (committed, not only reserved); a no-op while held."""
        if self.pointer is not None or self.nbytes <= 0:
            return
        _check(self.cuda.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        pointer = ctypes.c_uint64()
        size = ctypes.c_size_t(self.nbytes)
        _check(self.cuda.cuMemAlloc_v2(ctypes.byref(pointer), size), "cuMemAlloc_v2")
        _check(self.cuda.cuMemsetD8_v2(pointer, 0, size), "cuMemsetD8_v2")
        _check(self.cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        self.pointer = pointer

    def release(self) -> None:
        """Free the allocation; the context stays."""
        if self.pointer is None:
            return
        _check(self.cuda.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        _check(self.cuda.cuMemFree_v2(self.pointer), "cuMemFree_v2")
        self.pointer = None


def hold_vram(nbytes: int, device: int = 0) -> VramHold:
    """Create a context on ``device`` and allocate ``nbytes`` there; keep the result alive."""
    hold = VramHold(nbytes, device)
    hold.take()
    return hold


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
