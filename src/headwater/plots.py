"""Shared plotting set-up: matplotlib writing files only (no display needed)."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
