"""The DVC stages, one module each (`python -m pipeline.stages.<name>`); none imports another."""
