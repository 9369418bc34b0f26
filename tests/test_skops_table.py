"""skops's table of default-trusted types, kept once per environment: the same table, reused.

`model_files.import_skops` hands skops a copy of the table it would otherwise rebuild in every
process. The copy must be exactly skops's own table, and a copy from other package versions must
be ignored.
"""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.support import model_files
from tests.synthetic import REPO_ROOT

TABLE = """
import json, sys
{setup}
table = sys.modules["skops.io._trusted_types"]
print(json.dumps({{"from_copy": not hasattr(table, "__file__"),
                  "names": {{k: v for k, v in vars(table).items()
                            if k.isupper() and isinstance(v, list)
                            and all(isinstance(x, str) for x in v)}}}}))
"""


def _table(setup: str) -> dict:
    result = subprocess.run([sys.executable, "-c", TABLE.format(setup=setup)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_the_kept_table_is_skops_own_and_is_reused() -> None:
    via_pipeline = "from pipeline.support import model_files; model_files.import_skops()"
    _table(via_pipeline)  # keeps the table if it was not kept yet
    scanned = _table("import skops.io")
    reused = _table(via_pipeline)
    assert not scanned["from_copy"] and reused["from_copy"]
    assert reused["names"] == scanned["names"]
    assert "sklearn.linear_model._logistic.LogisticRegression" in (
        reused["names"]["SKLEARN_ESTIMATOR_TYPE_NAMES"])


def test_a_table_of_other_versions_is_ignored() -> None:
    path, key = model_files._trusted_types_cache()
    _table("from pipeline.support import model_files; model_files.import_skops()")
    kept = path.read_text()
    try:
        stale = json.loads(kept)
        stale["key"] = "skops==0.0.1"
        stale["names"]["SKLEARN_ESTIMATOR_TYPE_NAMES"] = ["builtins.eval"]
        path.write_text(json.dumps(stale))
        table = _table("from pipeline.support import model_files; model_files.import_skops()")
        assert not table["from_copy"]
        assert "builtins.eval" not in table["names"]["SKLEARN_ESTIMATOR_TYPE_NAMES"]
        assert json.loads(path.read_text())["key"] == key  # replaced by this version's table
    finally:
        path.write_text(kept)
