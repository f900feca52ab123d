"""KFP components: one folder per pipeline step, each a thin wrapper around ``cellseg.ops.steps``.

A component body imports ``cellseg`` when it runs, inside the project image; at module level
only kfp and the cluster settings (no torch) are imported.
"""

from cellseg.cluster.names import IMAGE

__all__ = ["IMAGE"]
