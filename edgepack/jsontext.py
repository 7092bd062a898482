"""JSON from a user or a bundle, parsed with a bound on nesting.

Python's json parser recurses once per nested array or object, so a few thousand ``[`` in a
calibration line, a --compare report or a re-summed manifest end in RecursionError (a traceback)
instead of a one-line refusal. The harness has the same rule in ``harness/bundle_check.py``
(it cannot import edgepack); both refuse more than ``MAX_JSON_DEPTH`` levels.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgepack.errors import UserError

# The deepest edgepack writes or reads is 5 (manifest.json); no user file needs more than a few.
MAX_JSON_DEPTH = 64
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text``, counted without recursion."""
    depth = deepest = 0
    for run in _NOT_BRACKET.split(_STRING.sub("", text)):
        for char in run:
            depth += 1 if char in "[{" else -1
            deepest = max(deepest, depth)
    return deepest


def parse_json(text: str, what: str) -> Any:
    """``json.loads`` that is a one-line ``UserError`` naming ``what`` for bad or deep JSON."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise UserError(
            f"{what}: JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed."
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{what} is not valid JSON: {exc}") from None
