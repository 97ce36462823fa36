"""Ground floor of safe-retrieval: geometry, encoders, artifacts, data, objectives, trainer, evaluator."""
