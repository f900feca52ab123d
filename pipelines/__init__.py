"""The cellseg Kubeflow pipeline: DAG, compile, local run, submit and schedule."""
