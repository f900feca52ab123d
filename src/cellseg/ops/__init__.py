"""Stage 5, operations: pipeline steps, MLflow tracking and registry, serving, comparisons."""
