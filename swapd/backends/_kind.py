"""What every backend kind must say about itself: one protocol, no name checks elsewhere.

A kind turns a preset into a command line, estimates what the model needs,
names its stop signal and the residency tiers it supports, and, where it can,
puts a live process to sleep and wakes it again.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

from swapd.weights import weight_bytes

if TYPE_CHECKING:
    from pathlib import Path

    from swapd.presets import Preset
    from swapd.probe import Device
    from swapd.upstream import UpstreamPool

# Where a model's weights are: serving on the device, asleep or paged in host RAM, on
# local disk, or only on slow storage not yet staged.
Tier: TypeAlias = Literal["device", "ram", "disk", "store"]
ALL_TIERS: tuple[Tier, ...] = ("device", "ram", "disk", "store")
RamVia: TypeAlias = Literal["sleep", "pages"]


@dataclass(frozen=True)
class Placement:
    """Where and how one start of a model runs."""

    on_gpu: bool = False
    # The share of the card granted, for backends that size themselves (vLLM).
    gpu_fraction: float | None = None
    device_env: Mapping[str, str] = field(default_factory=dict)
    # vLLM sleep level this start allows (the development endpoints); 0 = off.
    sleep_level: int = 0
    # Whether to pass ``--enable-sleep-mode`` (off when the backend refused it before).
    sleep_flag: bool = True
    # The model path to give the backend: the staged copy when there is one.
    model_path: str | None = None


@dataclass(frozen=True)
class OwnKey:
    """How a kind takes an API key of its own, which swapd sets to a new secret per start.

    With it, a local user who finds the backend's port cannot bypass swapd. The key
    goes in the environment (``/proc/PID/environ`` is private to the owner, the
    command line is not), and ``flags`` are the arguments a preset may not set.
    """

    env: str
    flags: tuple[str, ...]
    # The kind parses its arguments with argparse: ``--api_key`` and ``--api-ke`` set it too.
    argparse: bool = False


class BackendKind(Protocol):
    """One kind of backend (llama-server, vLLM, any OpenAI-compatible command)."""

    name: str
    tiers: frozenset[Tier]
    # How the kind reaches the ram tier: a sleeping process, or its weight file's pages
    # held in host RAM while stopped; None: it has no ram tier.
    ram_via: RamVia | None
    needs_model: bool
    # It takes the share of a GPU it is given (vLLM's --gpu-memory-utilization), whatever
    # the card: a footprint measured on one card says nothing of another.
    sizes_to_card: bool
    stop_signal: signal.Signals
    # The backend's own API key, which swapd sets and sends itself; None: it has none.
    own_key: OwnKey | None
    # The flags naming the model, which swapd passes itself (``model:``, or its staged
    # copy): a preset's own would run another model than the one admitted.
    model_flags: tuple[str, ...]
    # Preset keys the kind never reads, each with what to write instead: set in a preset's
    # own file, one would be silently ignored.
    unused_keys: Mapping[str, str]
    # It accepts connections while it loads and says on its health route when it has:
    # ``health: none`` (ready once the port accepts) would send requests to a loading engine.
    health_says_loaded: bool
    # Its own routes that /upstream/ refuses besides those every kind's are refused: ones
    # that act on every client or show its configuration, on only because swapd asked.
    reserved_routes: frozenset[str]
    # The flag naming what the engine answers to, which swapd sets to the preset's names
    # unless its args do; None: the kind answers to any name.
    served_name_flag: str | None

    def binary(self, preset: Preset) -> str:
        """The executable to run; raises :class:`BinaryNotFound` saying where it looked."""
        ...

    def argv(self, preset: Preset, binary: str, port: int, placement: Placement) -> list[str]:
        """The command line for one start on ``port``."""
        ...

    def extra_env(self, preset: Preset, placement: Placement) -> dict[str, str]:
        """Variables the kind itself needs (the preset's ``env`` is applied after)."""
        ...

    def estimate(self, preset: Preset, device: Device, total: int) -> int | None:
        """Bytes the model is expected to take on ``device``; None when unknown. Blocking I/O."""
        ...

    def own_share(self, preset: Preset, device: Device) -> float | None:
        """The share of ``device`` the preset's own args make it take, whatever swapd grants."""
        ...

    def gpus_needed(self, preset: Preset) -> int:
        """GPUs one start needs at once (vLLM's parallel sizes); swapd places on one."""
        ...

    def weight_bytes(self, preset: Preset, model: Path) -> int:
        """Bytes of weights a start loads from ``model`` (the preset's); raises OSError."""
        ...

    def refused_sleep(self, output: list[str]) -> str | None:
        """The output line where a failed start refused sleep mode, if it did."""
        ...

    def asleep_bytes(self, preset: Preset, weights: int, level: int) -> int:
        """Host RAM its process holds asleep on a GPU at ``level``, for ``weights`` bytes."""
        ...

    def pinned_bytes(self, preset: Preset, weights: int) -> int:
        """Host RAM a start on a GPU pins for its ``weights`` (vLLM's ``--cpu-offload-gb``)."""
        ...

    async def sleep(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """Put a live backend to sleep (free device memory, keep the process)."""
        ...

    async def wake(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """Wake a backend asleep at ``level`` and return once it serves again."""
        ...


class SleepUnsupported(Exception):
    """The kind has no sleep mode."""


class NoSleep:
    """The sleep half of the protocol for kinds that have no sleep mode."""

    name: str

    def refused_sleep(self, output: list[str]) -> str | None:
        """Never: the kind is started without sleep mode."""
        del output
        return None

    def asleep_bytes(self, preset: Preset, weights: int, level: int) -> int:
        """Nothing: a process of this kind never sleeps."""
        del preset, weights, level
        return 0

    async def sleep(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """Refuse: a process of this kind cannot sleep."""
        del pool, host, port, level
        raise SleepUnsupported(self.name)

    async def wake(self, pool: UpstreamPool, host: str, port: int, level: int) -> None:
        """Refuse: a process of this kind cannot sleep."""
        del pool, host, port, level
        raise SleepUnsupported(self.name)


class OneProcess(NoSleep):
    """What a kind without sleep that loads its model file as it is says of its resources.

    It takes what it loads (no share of the card), on the one GPU it is placed on, and keeps
    nothing in host RAM of its own beside the device.
    """

    def extra_env(self, preset: Preset, placement: Placement) -> dict[str, str]:
        """Nothing beyond the device's variables."""
        del preset, placement
        return {}

    def own_share(self, preset: Preset, device: Device) -> float | None:
        """None: it takes what it loads, not a share of the card."""
        del preset, device
        return None

    def weight_bytes(self, preset: Preset, model: Path) -> int:
        """The model file's bytes (every shard of a split GGUF)."""
        del preset
        return weight_bytes(model)

    def pinned_bytes(self, preset: Preset, weights: int) -> int:
        """None: it keeps no weights in host RAM of its own while it runs on a GPU."""
        del preset, weights
        return 0

    def gpus_needed(self, preset: Preset) -> int:
        """One: it runs on the GPU its placement shows it."""
        del preset
        return 1
