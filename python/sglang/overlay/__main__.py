"""``python -m sglang.overlay``: which upstream release this is, and the overlay version.

Needs only the standard library (the fork wheel's ``sglang/__init__.py`` defers upstream's
imports when sglang's runtime is not installed); says so when the runtime is missing.
"""

from sglang.overlay import describe

print(describe())
