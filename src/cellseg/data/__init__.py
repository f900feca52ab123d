"""Stage 1, raw VOC -> converted dataset: fetch and verify BCCD, parse VOC, pseudo-masks, COCO."""
