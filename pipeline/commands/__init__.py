"""What a person or a scheduler runs: the direct Hydra run, predict, serve, ui, retrain, ..."""
