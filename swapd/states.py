"""A model's states and the one table of moves between them.

Only the manager moves a model, and only through :func:`check`, which refuses
a move the table does not list and a move from a state other than the one the
caller expected (a read that gates a mutation must not go stale). The main
paths::

    cold start   STOPPED -> QUEUED -> STARTING -> READY
    wake         ASLEEP  -> QUEUED -> WAKING   -> READY
    demote       READY (-> DRAINING) -> SLEEPING -> ASLEEP        device -> ram
    stop         READY (-> DRAINING) -> STOPPING -> STOPPED       device -> ram/disk
    down a tier  ASLEEP -> STOPPING -> STOPPED                    ram -> disk
    failure      QUEUED/STARTING/WAKING/READY/DRAINING/SLEEPING/ASLEEP -> FAILED
    backoff      FAILED -> BACKOFF -> FAILED (at retry_at) -> QUEUED;  5 in a row: FAILED stays
    retry        FAILED -> QUEUED;  unload a failure: FAILED/BACKOFF -> STOPPED

:data:`EDGES` lists every edge with the reason it exists.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping


class State(enum.Enum):
    """Where a model is in its life."""

    STOPPED = "stopped"  # no process; its tier is ram (warm pages), disk or store
    QUEUED = "queued"  # wanted: waiting for admission, staging or busy models
    STARTING = "starting"  # spawned, not yet answering its health path
    READY = "ready"  # serving
    DRAINING = "draining"  # no new requests; waits for those in flight, then stops or sleeps
    SLEEPING = "sleeping"  # asked to sleep (vLLM /sleep); the process stays
    ASLEEP = "asleep"  # alive, weights in host RAM: the ram tier
    WAKING = "waking"  # asked to wake (vLLM /wake_up)
    STOPPING = "stopping"  # signalled; waiting for the process group to go
    BACKOFF = "backoff"  # a start failed; requests get 503 until retry_at
    FAILED = "failed"  # the backend died, or starts failed too often in a row (breaker)


S = State
# Every allowed move and the reason it exists.
EDGES: Mapping[tuple[State, State], str] = {
    (S.STOPPED, S.QUEUED): "a request or a load wants the model",
    (S.QUEUED, S.STARTING): "admitted: the process is spawned",
    (S.QUEUED, S.WAKING): "admitted: the sleeping process is woken",
    (S.QUEUED, S.FAILED): "no room, queue timeout, staging or spawn error",
    (S.QUEUED, S.STOPPED): "refused for memory or queue time, or cancelled, before any process",
    (S.QUEUED, S.ASLEEP): "a wake was refused or cancelled; the process still sleeps",
    (S.STARTING, S.READY): "the health path answered 200",
    (S.STARTING, S.FAILED): "the process exited or missed start_timeout",
    (S.STARTING, S.STOPPED): "cancelled (shutdown) while starting; the process was stopped",
    (S.WAKING, S.READY): "/is_sleeping said false",
    (S.WAKING, S.FAILED): "the wake failed or the process died",
    (S.WAKING, S.STOPPED): "cancelled (shutdown) while waking; the process was stopped",
    (S.READY, S.DRAINING): "unload or demotion asked while requests are in flight",
    (S.READY, S.STOPPING): "idle: evicted, TTL expired, unloaded or shut down",
    (S.READY, S.SLEEPING): "idle: demoted to the ram tier",
    (S.READY, S.FAILED): "the backend exited by itself",
    (S.DRAINING, S.READY): "drained for a swap (max_wait) that took another model instead",
    (S.DRAINING, S.STOPPING): "the last request finished",
    (S.DRAINING, S.SLEEPING): "the last request finished; demoted to the ram tier",
    (S.DRAINING, S.FAILED): "the backend exited while draining",
    (S.SLEEPING, S.ASLEEP): "/sleep answered",
    (S.SLEEPING, S.FAILED): "the sleep failed or the process died",
    (S.ASLEEP, S.QUEUED): "a request or a load wants the model back on the device",
    (S.ASLEEP, S.STOPPING): "down to the disk tier: ram_ttl, the ram budget, or shutdown",
    (S.ASLEEP, S.FAILED): "the sleeping process died",
    (S.STOPPING, S.STOPPED): "the process group is gone",
    (S.FAILED, S.STOPPED): "unloaded, or the dead backend's group was reaped",
    (S.FAILED, S.QUEUED): "a new request retries after a crash, or an explicit load resets",
    (S.FAILED, S.BACKOFF): "a start failed: the next one waits, 1 s doubling up to 60 s",
    (S.BACKOFF, S.QUEUED): "retry_at passed and a request wants it, or an explicit load",
    (S.BACKOFF, S.FAILED): "retry_at passed with no request: the next one starts it",
    (S.BACKOFF, S.STOPPED): "unloaded while backing off",
}

# States in which a process of the model exists.
WITH_PROCESS = frozenset(
    {S.STARTING, S.READY, S.DRAINING, S.SLEEPING, S.ASLEEP, S.WAKING, S.STOPPING}
)
# States in which the model holds device memory (asleep: only what the driver keeps).
ON_DEVICE = frozenset({S.STARTING, S.READY, S.DRAINING, S.SLEEPING, S.WAKING, S.STOPPING})
# States in which a process is still taking the memory it was granted.
COMING_UP = frozenset({S.STARTING, S.WAKING})
# States in which a move is under way; such a model is never chosen as a victim.
IN_TRANSITION = frozenset({S.QUEUED, S.STARTING, S.DRAINING, S.SLEEPING, S.WAKING, S.STOPPING})


class BadTransition(RuntimeError):
    """A move the table does not allow, or from a state other than the expected one."""


def check(current: State, expected: State | Collection[State], new: State) -> None:
    """Raise :class:`BadTransition` unless ``current`` is expected and ``current -> new`` exists."""
    allowed = (expected,) if isinstance(expected, State) else tuple(expected)
    if current not in allowed:
        names = "/".join(s.name for s in allowed)
        raise BadTransition(f"expected {names}, found {current.name} (moving to {new.name})")
    if (current, new) not in EDGES:
        raise BadTransition(f"no edge {current.name} -> {new.name}")
