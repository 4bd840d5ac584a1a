"""Git Re-Basin for the LDM UNet (ALGORITHMS.md §14): a function-preserving permutation spec built
from the key layout (`spec`), the constrained assignment solver (`assignment`), weight matching by
coordinate descent over bounded on-demand reads (`matching`), the `rebasin` / `basin_sum` methods
(`method`) and the a→b→c "Fermat" post-process (`fermat`).

This package file imports nothing on purpose: `methods/__init__` imports `rebasin.method`, and the
engine imports `rebasin.fermat` lazily, so no import cycle can form.
"""
