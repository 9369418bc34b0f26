"""What the stages and the commands share: configuration, MLflow store and runs, model files."""
