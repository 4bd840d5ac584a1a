"""Git Re-Basin for the LDM UNet (ALGORITHMS.md §14): a function-preserving permutation spec built
from the key layout (`spec`), the constrained assignment solver (`assignment`), weight matching by
coordinate descent over bounded on-demand reads (`matching`) and the `rebasin` / `basin_sum` methods
(`method`). The a→b→c "Fermat" post-process is a plan stage in `core/fermat.py`.

This package file imports nothing on purpose: `methods/__init__` imports `rebasin.method` and
core imports the modules it needs, so importing one part never loads the others.
"""
