"""Serving the registered model: request payloads to images, cells to responses (``payload``),
and the KServe model server the cluster's InferenceService runs (``server``)."""
