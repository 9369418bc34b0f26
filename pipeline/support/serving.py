"""The pyfunc loader of the model versions logged before the loader moved: keep this name.

Their MLmodel files say `loader_module: pipeline.support.serving`, and `mlflow.pyfunc.load_model`
(so `mlflow models serve`) imports that name to call `_load_pyfunc`. It loads them exactly as
the new versions are loaded, by `pipeline.support.model_loader`; the served model itself is
`pipeline.support.pyfunc_model`. Remove this file only when no stored version names it.
"""

from pipeline.support.model_loader import _load_pyfunc

__all__ = ["_load_pyfunc"]
