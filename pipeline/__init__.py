"""Fashion-MNIST softmax regression pipeline: DVC stages, Hydra configuration, MLflow tracking.

Four layers, each importing only from those below it: `commands` (what people and schedulers
run), `stages` (one module per DVC stage), `support` (configuration, MLflow plumbing, model
files) and `core` (the maths and data handling in plain numpy/pandas/scikit-learn). Beside the
stages, `team` is the team stack (PostgreSQL, SeaweedFS, the MLflow server, its users), part by
part; only `commands.team` drives it, and it imports from `support` and `core` only.
"""

__version__ = "0.1.0"
