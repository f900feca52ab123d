"""Stage 6, the registry: MLflow tracking (one parent run per pipeline run), the champion
re-scored on each run's split, the promotion gate and its compare-and-set, the registered pyfunc,
and comparisons of runs. It may import serving's schema; serving never imports it."""
