"""Fashion-MNIST softmax regression pipeline: DVC stages, Hydra configuration, MLflow tracking.

Floors, each importing only from those below it (tests/test_layers.py): `commands` (what people
and schedulers run; no command imports another), `stage_chain` (train → evaluate → register in one
process), `stages` (one module per DVC stage), `team` (the team stack, part by part), `support`
(configuration, MLflow plumbing, the model's files and its one loader) and `core` (the maths and
data handling in plain numpy/pandas/scikit-learn).
"""

__version__ = "0.1.0"
