"""The framework-free core: softmax maths, the estimator, IDX reading and splitting.

Nothing in this package imports MLflow, DVC or Hydra, so it can be copied into any project.
"""
