"""Durations and sizes as users write them in YAML, and sizes as swapd writes them in messages."""

from __future__ import annotations

import re

import pytest

from swapd.units import format_size, parse_duration, parse_size

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("10m", 600.0, id="minutes"),
        pytest.param("90s", 90.0, id="seconds"),
        pytest.param("1.5s", 1.5, id="fractional-seconds"),
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("1d", 86400.0, id="days"),
        pytest.param("45", 45.0, id="bare-number-string-is-seconds"),
        pytest.param(" 10 m ", 600.0, id="spaces-around-and-inside"),
        pytest.param("0s", 0.0, id="zero-with-unit"),
        pytest.param(30, 30.0, id="int-is-seconds"),
        pytest.param(2.5, 2.5, id="float-is-seconds"),
        pytest.param(0, 0.0, id="int-zero"),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    """Every duration form the docs promise becomes the right number of seconds."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("ten", 'expected a duration like "10m", got "ten"', id="word"),
        pytest.param("5x", 'expected a duration like "10m", got "5x"', id="unknown-unit"),
        pytest.param("5S", 'expected a duration like "10m", got "5S"', id="unit-is-lowercase"),
        pytest.param("", 'expected a duration like "10m", got ""', id="empty"),
        pytest.param("-5s", 'expected a duration like "10m", got "-5s"', id="negative-string"),
        pytest.param("1.5.2s", 'expected a duration like "10m", got "1.5.2s"', id="two-dots"),
        pytest.param("10 min", 'expected a duration like "10m", got "10 min"', id="long-unit"),
        pytest.param(None, 'expected a duration like "10m", got "None"', id="null"),
        pytest.param(-1, "expected a duration from 0 to 100 years, got -1", id="negative-int"),
        pytest.param(
            -0.5, "expected a duration from 0 to 100 years, got -0.5", id="negative-float"
        ),
        pytest.param(
            10**400,
            f"expected a duration from 0 to 100 years, got {'1' + '0' * 39}... (401 characters)",
            id="int-too-large-for-a-float",
        ),
        pytest.param(
            "9" * 400 + "s",
            f'expected a duration from 0 to 100 years, got "{"9" * 40}... (401 characters)"',
            id="string-too-large-for-a-float",
        ),
        pytest.param(
            "200y", 'expected a duration like "10m", got "200y"', id="years-are-not-a-unit"
        ),
        pytest.param(
            "40000d", 'expected a duration from 0 to 100 years, got "40000d"', id="past-a-century"
        ),
        pytest.param(True, 'expected a duration like "10m", got True', id="bool-is-not-1s"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    """A bad duration is refused with a message that shows the expected form and the value."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_duration(value)


def test_parse_duration_rejects_nan() -> None:
    """NaN (YAML ``.nan``) is not a duration: accepted, it makes every timeout comparison false."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(float("nan"))


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        pytest.param("6GiB", 6 * GIB, id="gib"),
        pytest.param("512MiB", 512 * MIB, id="mib"),
        pytest.param("4KiB", 4 * KIB, id="kib"),
        pytest.param("2TiB", 2 * TIB, id="tib"),
        pytest.param("512MB", 512 * 1000**2, id="mb-is-decimal"),
        pytest.param("2GB", 2 * 1000**3, id="gb-is-decimal"),
        pytest.param("3kB", 3000, id="kb-is-decimal"),
        pytest.param("1TB", 1000**4, id="tb-is-decimal"),
        pytest.param("1.5G", 1_500_000_000, id="bare-letter-is-decimal"),
        pytest.param("2Gi", 2 * GIB, id="letter-i-without-b-is-binary"),
        pytest.param("6gib", 6 * GIB, id="case-insensitive"),
        pytest.param(" 1 GiB ", GIB, id="spaces-around-and-inside"),
        pytest.param("0.5GiB", GIB // 2, id="fractional-binary"),
        pytest.param("100b", 100, id="bytes-unit"),
        pytest.param("4096", 4096, id="bare-number-string-is-bytes"),
        pytest.param(8192, 8192, id="int-is-bytes"),
        pytest.param(0, 0, id="zero"),
        pytest.param(1.5, 2, id="float-rounds-to-whole-bytes"),
        # Decimal sizes are exact: 2.01 kB is 2010 bytes, not one byte short.
        pytest.param("2.01KB", 2010, id="exact-decimal-kb"),
        pytest.param("2.01GB", 2_010_000_000, id="exact-decimal-gb"),
    ],
)
def test_parse_size_accepts(value: object, nbytes: int) -> None:
    """Every size form the docs promise becomes the exact number of bytes."""
    assert parse_size(value) == nbytes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("lots", 'expected a size like "6GiB", got "lots"', id="word"),
        pytest.param("6XB", 'expected a size like "6GiB", got "6XB"', id="unknown-unit"),
        pytest.param("6GiBs", 'expected a size like "6GiB", got "6GiBs"', id="trailing-letter"),
        pytest.param("", 'expected a size like "6GiB", got ""', id="empty"),
        pytest.param("-1GiB", 'expected a size like "6GiB", got "-1GiB"', id="negative-string"),
        pytest.param(-1.5, 'expected a size like "6GiB", got "-1.5"', id="negative-float"),
        pytest.param(None, 'expected a size like "6GiB", got "None"', id="null"),
        pytest.param(float("inf"), 'expected a size like "6GiB", got "inf"', id="infinity"),
        pytest.param(-1, "expected a size from 0 to 8 EiB, got -1", id="negative-int"),
        pytest.param(2**63, f"expected a size from 0 to 8 EiB, got {2**63}", id="past-int64"),
        pytest.param(
            "9" * 400 + "GiB",
            f'expected a size from 0 to 8 EiB, got "{"9" * 40}... (403 characters)"',
            id="string-too-large-for-a-float",
        ),
        pytest.param(True, 'expected a size like "6GiB", got True', id="bool-is-not-1-byte"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    """A bad size is refused with a message that shows the expected form and the value."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_size(value)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        pytest.param(0, "0.0 MiB", id="zero"),
        pytest.param(512 * MIB, "512.0 MiB", id="mib"),
        pytest.param(1536 * KIB, "1.5 MiB", id="fractional-mib"),
        pytest.param(GIB, "1.0 GiB", id="exactly-one-gib-switches-unit"),
        pytest.param(int(7.9 * GIB), "7.9 GiB", id="gib"),
        pytest.param(80 * GIB, "80.0 GiB", id="large"),
        pytest.param(2 * TIB, "2048.0 GiB", id="tib-stays-gib"),
        pytest.param(-2 * GIB, "-2.0 GiB", id="negative-gib"),
        pytest.param(-3 * MIB, "-3.0 MiB", id="negative-mib"),
        pytest.param(2.5 * GIB, "2.5 GiB", id="float"),
    ],
)
def test_format_size(nbytes: float, text: str) -> None:
    """Sizes in messages read as GiB from one GiB up and as MiB below, one decimal place."""
    assert format_size(nbytes) == text
