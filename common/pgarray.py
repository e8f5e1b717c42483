"""Array parameters sent as one PostgreSQL array literal (`'{1,2,3}'`) instead of a Python list.

psycopg2 adapts a list element by element into `ARRAY[...]` through its adaptation protocol: for
the statements that pass hundreds of values (a batch's INSERT, a worker's apply), that cost
~0.5 ms of client CPU per 1,000 values, and PostgreSQL then parses and folds a constant per
element. One string, built with `str.join`, is adapted once, and PostgreSQL reads it with the
array type's input function. The statements keep their `CAST(:name AS type[])`, which gives the
literal its type; the values and NULLs are exactly those of the list.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_INTEGER = frozenset({"bigint", "integer", "smallint", "int", "int2", "int4", "int8"})


def integers(values: Iterable[int | None]) -> str:
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def numerics(values: Iterable[Any]) -> str:
    """Decimals (or ints), as `str` writes them: the text psycopg2 itself sends for a Decimal."""
    out = []
    for v in values:
        if v is None:
            out.append("NULL")
        else:
            text = str(v)
            if not text[-1].isdigit():  # NaN, sNaN, Infinity: never an amount
                raise ValueError(f"not a finite amount: {text}")
            out.append(text)
    return "{" + ",".join(out) + "}"


def texts(values: Iterable[str | None]) -> str:
    """Every element quoted, `\\` and `"` escaped: commas, braces, spaces and the word NULL are
    then plain characters of the element."""
    return "{" + ",".join(
        "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values) + "}"


_ENCODERS = {"numeric": numerics, "text": texts, **{k: integers for k in _INTEGER}}
_CAST = re.compile(r"CAST\(:(\w+) AS (\w+)\[\]\)")


class ArrayParams:
    """For one SQL text: turns each list given for a `CAST(:name AS type[])` of an integer,
    numeric or text type into its array literal; every other parameter passes as it is."""

    def __init__(self, sql: str):
        self._encoders = {name: _ENCODERS[kind] for name, kind in _CAST.findall(sql)
                          if kind in _ENCODERS}

    def __call__(self, params: Mapping[str, Any]) -> dict[str, Any]:
        encoders = self._encoders
        return {name: encoders[name](value) if name in encoders and isinstance(value, (list, tuple))
                else value for name, value in params.items()}
