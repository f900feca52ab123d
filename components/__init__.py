"""KFP components: one folder per pipeline step, each a thin wrapper around its
``cellseg.steps`` module, calling it with keywords.

A component body imports ``cellseg`` when it runs, inside the project image; at module level
only kfp and the settings (no torch) are imported.
"""

from cellseg.settings import IMAGE

__all__ = ["IMAGE"]
