"""Staging throughput: swapd's copy into the staging cache against ``cp`` of the same file.

Each round times, in a rotating order, on the same disk and from a cold page cache:

* ``cp``          -- ``cp SOURCE DEST`` until it exits (its data may still be in the page
  cache, not on the disk);
* ``cp + fsync``  -- the same run until an ``fsync`` of the copy returns;
* ``stage``       -- ``StagingCache.stage(source)`` until it returns: scan, copy, check,
  publish (renamed into place, not yet fsynced), which is when a load can start;
* ``stage, synced`` -- the same run until the background fsync has marked the copy synced
  (``StagingCache.synced()``), the like-for-like of ``cp + fsync``;
* ``stage + sha256`` and ``stage + sha256, synced`` -- the same with the digest checked
  while copying.

Before every run the source's pages are dropped (``fsync`` then
``posix_fadvise(POSIX_FADV_DONTNEED)``), and after it the copy's are dropped and the copy
deleted, then ``sync`` runs, so no run inherits another's cached or dirty pages.

    python scripts/bench_staging.py [--size 1GiB] [--rounds 7] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import _bench
from _bench import Json

from swapd import logs
from swapd.staging import StagingCache
from swapd.units import format_size, parse_size

VARIANTS = ("cp", "stage", "stage + sha256")
# Each run gives two times: until it returns, and until its copy is on the disk.
COLUMNS = (
    "cp",
    "cp + fsync",
    "stage",
    "stage, synced",
    "stage + sha256",
    "stage + sha256, synced",
)


def make_source(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (kept between runs); the file's sha256."""
    digest = hashlib.sha256()
    if not path.exists() or path.stat().st_size != size:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as file:
            left = size
            while left:
                block = os.urandom(min(left, 16 * 1024 * 1024))
                file.write(block)
                left -= len(block)
            os.fsync(file.fileno())
        tmp.replace(path)
    with path.open("rb", buffering=0) as file:
        while block := file.read(16 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def drop_cache(path: Path) -> None:
    """Write a file back and drop its pages, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Wait until a file's data is on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_cp(source: Path, dest: Path) -> tuple[float, float]:
    """Seconds for ``cp`` to exit, and until the copy is fsynced."""
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(dest)], check=True)
    exited = time.perf_counter() - started
    fsync_file(dest)
    return exited, time.perf_counter() - started


async def run_stage(
    cache: StagingCache, source: Path, sha256: str | None
) -> tuple[float, float, Path]:
    """Seconds for one stage into an empty cache: until it returns, until its copy is synced.

    Also where the copy went.
    """
    started = time.perf_counter()
    path = await cache.stage(source, sha256=sha256)
    returned = time.perf_counter() - started
    await cache.synced()
    return returned, time.perf_counter() - started, path


async def measure(
    source: Path, size: int, work: Path, sha256: str, rounds: int
) -> dict[str, list[float]]:
    """Seconds per run for every variant, ``rounds`` rounds, the order rotating each round."""
    times: dict[str, list[float]] = {column: [] for column in COLUMNS}
    cache_dir = work / "cache"
    dest = work / "cp-copy"
    async with StagingCache(cache_dir, size) as cache:
        for n in range(rounds):
            order = VARIANTS[n % 3 :] + VARIANTS[: n % 3]
            for variant in order:
                await asyncio.to_thread(settle, source)
                if variant == "cp":
                    exited, synced = await asyncio.to_thread(run_cp, source, dest)
                    times["cp"].append(exited)
                    times["cp + fsync"].append(synced)
                    copy = dest
                else:
                    digest = sha256 if variant == "stage + sha256" else None
                    returned, synced, copy = await run_stage(cache, source, digest)
                    times[variant].append(returned)
                    times[f"{variant}, synced"].append(synced)
                drop_cache(copy)
                if variant == "cp":
                    dest.unlink()
                else:
                    await cache.evict([e.key for e in cache.entries()])
            print(
                f"round {n + 1}/{rounds}: "
                + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
            )
    return times


def settle(source: Path) -> None:
    """A cold source and a quiet disk: drop the source's pages, flush everything dirty."""
    drop_cache(source)
    os.sync()


def report(times: dict[str, list[float]], size: int) -> list[list[object]]:
    """One row per variant: median seconds, MiB/s, and the ratios to cp and cp + fsync."""
    rows: list[list[object]] = []
    cp, synced = times["cp"], times["cp + fsync"]
    for variant, seconds in times.items():
        rows.append(
            [
                variant,
                round(_bench.median(seconds), 3),
                round(min(seconds), 3),
                round(size / 2**20 / _bench.median(seconds)),
                round(speedup(cp, seconds), 2),
                round(speedup(synced, seconds), 2),
            ]
        )
    return rows


def speedup(base: list[float], seconds: list[float]) -> float:
    """The median over rounds of base time / this time: above 1 is faster than the base."""
    return _bench.median([b / s for b, s in zip(base, seconds, strict=True)])


def main() -> None:
    """Parse arguments, make the source file, measure, print and write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="1GiB", help="size of the test file (default 1GiB)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--dir",
        type=Path,
        default=_bench.default_cache_dir() / "staging",
        help="where the source, the cp copy and the cache go: the disk under test",
    )
    p.add_argument("--out", type=Path, default=Path("out/bench_staging.json"))
    args = p.parse_args()
    logs.configure("warning")  # staging.copy.* lines would interleave with the rounds
    size = parse_size(args.size)
    info = _bench.machine_info()
    _bench.print_machine(info)
    source = args.dir / f"source-{size}.bin"
    print(f"writing {format_size(size)} of random bytes to {source}")
    sha256 = make_source(source, size)
    work = args.dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        times = _bench.run_async(measure(source, size, work, sha256, args.rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ["variant", "median s", "min s", "MiB/s", "cp / this", "cp+fsync / this"]
    rows = report(times, size)
    _bench.print_table(headers, rows)
    data: Json = {"machine": _bench.finish_info(info), "size": size, "rounds": args.rounds}
    data |= {"seconds": times, "table": {"headers": headers, "rows": rows}}
    _bench.write_json(args.out, data)


if __name__ == "__main__":
    main()
