"""Where the CLI looks for swapd when the system config is there but cannot be read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from daemon import free_port

from swapd import _client
from swapd._client import Client, ClientError, Target


def test_an_unreadable_system_config_is_named_when_the_default_address_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Others than root and the group swapd get the default address, and why, if it fails.

    /etc/swapd/swapd.yaml is written 0640, group swapd: keys may be written in it.
    """
    broken = tmp_path / "swapd.yaml"
    broken.write_bytes(b"listen: [\n")  # stands in for a file this user may not read
    monkeypatch.setattr(_client, "SYSTEM_CONFIG", broken)
    monkeypatch.setattr(_client, "DEFAULT_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("SWAPD_URL", "SWAPD_CONFIG", "SWAPD_KEY"):
        monkeypatch.delenv(name, raising=False)
    target = Target.resolve(None, None, None)
    assert target.address_problem is not None
    assert str(broken) in target.address_problem

    async def status() -> None:
        async with Client(target) as client:
            await client.call("GET", "/swapd/status")

    with pytest.raises(ClientError) as info:
        asyncio.run(status())
    assert f"the default address: {broken}: cannot be read" in str(info.value)
    assert "pass --url, or run as a member of the group swapd" in str(info.value)


@pytest.mark.parametrize(
    "url", ["ftp://host:8080", "http://127.0.0.1:99999", "::1", "http://", "http://host:port"]
)
def test_a_url_no_swapd_can_answer_at_says_how_to_write_one(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--url ::1`` was tried as ``http://::1``, failing as "cannot reach"; ``http://`` too."""
    monkeypatch.delenv("SWAPD_CONFIG", raising=False)
    with pytest.raises(ClientError) as info:
        Target.resolve(url, None, None)
    assert str(info.value).startswith(f"not a usable swapd URL: {url!r}; write it as http://")


@pytest.mark.parametrize(
    ("url", "used"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("https://gpu-box/swapd/", "https://gpu-box/swapd"),
    ],
)
def test_usable_urls_are_taken_as_written(
    url: str, used: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listen address, a bracketed IPv6 address, a path behind a proxy."""
    monkeypatch.delenv("SWAPD_CONFIG", raising=False)
    assert Target.resolve(url, None, None).url == used
