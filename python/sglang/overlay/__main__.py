"""``python -m sglang.overlay``: which upstream release this is, and the overlay version."""

from sglang.overlay import describe

print(describe())
