"""Pick the requested GPU indices out of those a source found."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swapd.probe._types import Unusable

if TYPE_CHECKING:
    from collections.abc import Collection


def select_indices(
    source: str, available: Collection[int], wanted: Collection[int] | None, warnings: list[str]
) -> list[int]:
    """Return the wanted indices that exist (all when ``wanted`` is None), warning about the rest.

    Raises Unusable when the source has no GPU or none of the wanted ones.
    """
    if not available:
        raise Unusable(f"{source} found no GPUs")
    if wanted is None:
        return sorted(available)
    found = ", ".join(f"gpu{index}" for index in sorted(available))
    chosen: list[int] = []
    for index in sorted(set(wanted)):
        if index in available:
            chosen.append(index)
        else:
            warnings.append(f"gpu{index} does not exist ({source} found {found}); dropped")
    if not chosen:
        raise Unusable(f"{source} has none of the requested GPUs")
    return chosen
