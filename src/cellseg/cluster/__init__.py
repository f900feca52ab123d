"""The cluster side: job objects, the launcher that runs and watches them, names shared with the
manifests, the project image and local containers. ``ops.steps`` calls it; it imports nothing
from ``cellseg.ops``, ``training`` or ``evaluation``."""
