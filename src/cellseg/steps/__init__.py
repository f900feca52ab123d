"""Stage 7, the pipeline's steps: one module per KFP component, each a plain function of paths
and strings that reads its inputs from arguments and writes its outputs to the folder it is
given. MLflow runs are linked through the pipeline run id, never through another step's
internals."""
