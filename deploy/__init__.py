"""Serving a published version: `python -m deploy.serve` (the server), `python -m deploy.shadow report` (shadow
comparisons), `Dockerfile` and `kserve.yaml` (a container and an InferenceService to run replicas)."""
