"""KFP components: one folder per pipeline step, each a thin wrapper around ``cellseg.steps``.

Only the standard library and kfp are imported at module level; a component body imports
``cellseg`` when it runs, inside the project image.
"""

# The project image; `make compile IMAGE=...` (or pipelines.compile --image) replaces it.
IMAGE = "cellseg-kfp:0.1.0"
