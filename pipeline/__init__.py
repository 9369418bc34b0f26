"""Fashion-MNIST softmax regression pipeline: DVC stages, Hydra configuration, MLflow tracking.

`pipeline.core` holds the maths and data handling in plain numpy/pandas; the modules next to it
are thin stages that read their configuration, call the core and record results.
"""

__version__ = "0.1.0"
