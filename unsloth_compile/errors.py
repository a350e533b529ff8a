"""The package's one error type.

Every error raised for bad input or an unsupported combination is an `UnslothCompileError`, a
`ValueError` (so `except ValueError` keeps working), and its message has one style: it starts
with `unsloth_compile` and the place (`unsloth_compile.compile:`, `unsloth_compile: option
...`), names the bad value, lists the valid ones and says the way out.
"""

from __future__ import annotations


class UnslothCompileError(ValueError):
    """Bad input or an unsupported combination; the message names the value and the way out."""
