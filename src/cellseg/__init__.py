"""cellseg: blood-cell instance segmentation."""
