"""``python -m swapd`` is the ``swapd`` command."""

from swapd.cli import main

main()
