"""``listen: :port`` serves every address, IPv4 and IPv6."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from daemon import Daemon, free_port


def _ipv6_loopback() -> bool:
    """Whether this host can listen on ``::1`` at all (a container may have no IPv6)."""
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_listen_without_a_host_serves_every_address_ipv6_included(tmp_path: Path) -> None:
    """README's config table: ``listen`` takes ``:port`` "for all addresses".

    ``:port`` was read as ``0.0.0.0``, so swapd bound IPv4 only and an IPv6 client
    (``[::1]``, or a host's global IPv6 address) got connection refused.
    """
    port = free_port()
    daemon = Daemon(tmp_path / "swapd", {}, {"listen": f":{port}"}, port=port)
    daemon.start()
    try:
        for host in ("[::1]", "127.0.0.1"):
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as resp:
                assert resp.status == 200
    finally:
        assert not daemon.cleanup()
