"""Pure policies: no I/O, no clock, no global random (DESIGN.md §1).

Every time-dependent method takes ``now: float``; every random draw uses a
``random.Random`` passed in by the caller. ``tests/test_purity.py`` enforces it.
"""
