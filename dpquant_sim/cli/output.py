"""``--json`` output: one strict JSON document on stdout.

Non-finite numbers have no JSON spelling (Python would write ``Infinity`` / ``NaN``, which jq and most parsers
refuse), so they become ``null``: a non-private run's epsilon, an unreleased training loss, a price a profile
does not set.

>>> json_document({"epsilon": float("inf"), "loss": float("nan"), "acc": [0.5, 1]})
'{\\n  "epsilon": null,\\n  "loss": null,\\n  "acc": [\\n    0.5,\\n    1\\n  ]\\n}'
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_document(obj: Any) -> str:
    """``obj`` as indented strict JSON (non-finite numbers as null; other objects by ``str``)."""
    return json.dumps(finite_or_none(obj), indent=2, default=str, allow_nan=False)
