"""``swapd import-llama-swap``: a llama-swap ``config.yaml`` as a swapd layout.

:mod:`.macros` expands llama-swap's ``${name}`` macros, :mod:`.command` reads a
model's ``cmd`` as a backend, :mod:`.model` maps one model's keys to a preset,
and :mod:`.importer` reads the whole file (groups, hooks, global keys) and
writes ``swapd.yaml`` and ``presets/``. Every setting that does not carry over
becomes a :class:`.notes.Note` that names its line in ``config.yaml``.
"""
