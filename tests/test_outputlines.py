"""A backend's output as bounded lines: newlines, carriage returns, long lines, any split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from swapd.outputlines import MAX_LINE_BYTES, OutputLines


def _all_lines(reads: list[bytes]) -> list[str]:
    lines = OutputLines()
    out = [line for read in reads for line in lines.feed(read)]
    last = lines.finish()
    return [*out, *([] if last is None else [last])]


def _as_a_terminal_shows(output: bytes) -> list[str]:
    """The reference: whole lines, CRLF ended, each shown from its last carriage return."""
    pieces = output.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    shown = []
    for piece in pieces:
        line = piece.removesuffix(b"\r")
        shown.append(line[line.rfind(b"\r") + 1 :].decode("utf-8", "replace"))
    return shown


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_any_split_of_short_output_gives_what_a_terminal_shows(
    output: bytes, data: st.DataObject
) -> None:
    """However the output is cut into reads, the lines are the same."""
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(output) - 1)), max_size=6)))
    reads = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
    expected = _as_a_terminal_shows(output)
    got = _all_lines([r for r in reads if r])
    # A multibyte character cut by a read boundary decodes the same either way here:
    # lines are joined as bytes before decoding.
    assert got == expected


def test_crlf_ends_a_line_and_a_lone_carriage_return_redraws_it() -> None:
    """A CRLF split across reads still ends the line; a progress bar shows its last frame."""
    assert _all_lines([b"ready\r", b"\nnext\n"]) == ["ready", "next"]
    frames = [f"{i}%\r".encode() for i in range(101)]
    assert _all_lines([*frames, b"done\n"]) == ["done"]
    assert _all_lines([*frames[:-1], b"100%\n"]) == ["100%"]


def test_a_carriage_return_past_the_cut_still_redraws_the_line() -> None:
    """A read that ends in a carriage return after the line is full: the next starts it over."""
    long = b"a" * (MAX_LINE_BYTES + 6) + b"\r"
    assert _all_lines([long, b"bbbbb\n"]) == ["bbbbb"]


def test_a_long_line_keeps_its_start_and_says_how_much_was_cut() -> None:
    """A line of megabytes keeps MAX_LINE_BYTES; the next line is whole again."""
    big = b"x" * (3 * 1024 * 1024)
    reads = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    lines = _all_lines([*reads, b"\nafter\n"])
    assert lines == [
        "x" * MAX_LINE_BYTES + f" ...[{len(big) - MAX_LINE_BYTES} bytes cut]",
        "after",
    ]


def test_what_a_line_keeps_stays_bounded_however_long_it_grows() -> None:
    """100 MiB without a newline, read 64 KiB at a time: never more than MAX_LINE_BYTES kept.

    The pump used to join every read to what was pending and split it all again, a
    quadratic cost (about a minute for this line) and the whole line in memory.
    """
    lines = OutputLines()
    read = b"y" * 65536
    for _ in range(1600):
        assert lines.feed(read) == []
        assert lines._size <= MAX_LINE_BYTES
    last = lines.finish()
    assert last is not None
    assert last.endswith(f"...[{1600 * 65536 - MAX_LINE_BYTES} bytes cut]")
