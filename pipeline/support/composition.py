"""conf/ composed with Hydra overrides into the text of params.yaml, exactly as `dvc exp run` does.

DVC's own function does the work, so the file is byte-identical to what `dvc exp run` writes;
`make params` (commands/params.py) and tune both compose through here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.support.config import PARAMS_FILE
from pipeline.support.workspace import CONFIG_DIR

CONFIG_NAME = "config"  # conf/config.yaml, the root of the composition


def compose(root: Path, overrides: Sequence[str] = ()) -> str:
    """The text of params.yaml for the conf/ under `root`, with Hydra `overrides` applied."""
    from dvc.utils.hydra import compose_and_dump  # imports Hydra; slow, so only when needed

    root = root.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / PARAMS_FILE
        compose_and_dump(output, str(root / CONFIG_DIR), None, CONFIG_NAME, str(root),
                         list(overrides))
        return output.read_text()
