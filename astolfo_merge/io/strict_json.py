"""JSON from files we did not write (safetensors headers, recipes, caches): bounded, or one clear error.

`json.loads` alone lets hostile input escape as RecursionError (200 000 nested brackets), as the
ValueError of Python's 4300-digit integer limit, or silently keeps the last of two equal names. Here
every such document raises `JSONInputError` (a ValueError) whose text says what is wrong, so that
callers can wrap it into an error naming the file or field.
"""
from __future__ import annotations

import json


class JSONInputError(ValueError):
    """The document is not JSON we accept; str() is a short reason, no traceback needed."""


def loads(data, *, max_depth: int = 32, max_digits: int = 32, what: str = "name"):
    """Parse `data` (str, or bytes that must be UTF-8, a leading BOM allowed).

    Refused: bytes that are not UTF-8, syntax errors, integers longer than `max_digits` digits,
    containers nested deeper than `max_depth`, and an object with the same name twice (`what` says
    what a name is in the message: "tensor name", "field").
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"is not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None

    def parse_int(text):
        if len(text.lstrip("-")) > max_digits:
            raise JSONInputError(f"holds an integer of {len(text.lstrip('-'))} digits (at most {max_digits} accepted)")
        return int(text)

    def unique(pairs):
        out = {}
        for name, value in pairs:
            if name in out:
                raise JSONInputError(f"has the {what} {_short(name)} twice")
            out[name] = value
        return out

    try:
        doc = json.loads(data, parse_int=parse_int, object_pairs_hook=unique)
    except RecursionError:
        raise JSONInputError(f"is nested too deeply (more than {max_depth} levels)") from None
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if depth(doc, max_depth) > max_depth:
        raise JSONInputError(f"is nested too deeply (more than {max_depth} levels)")
    return doc


def depth(doc, limit: int) -> int:
    """Nesting depth of lists / dicts in `doc` (a scalar is 0), counted up to limit + 1 (iterative)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _short(name: str, limit: int = 60) -> str:
    text = repr(name)
    return text if len(text) <= limit else text[:limit - 4] + "…" + text[-3:]
