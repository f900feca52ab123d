"""Stage 4, a checkpoint as a predictor: post-processing, metrics, evaluation reports, predict."""
