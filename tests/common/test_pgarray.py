from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st
from sqlalchemy import text

from common import pgarray

ODD_TEXTS = ["", "NULL", "null", " ", "a,b", "{x}", '"', '\\', '\\"', "'", "tab\tnew\nline",
             "é ü 漢字 😀", "{}", "a\\,b", '""', " lead", "trail "]


def _round_trip(db, literal: str, kind: str):
    with db.engine.connect() as conn:
        return conn.execute(text(f"SELECT CAST(:a AS {kind}[])"), {"a": literal}).scalar_one()


def test_texts_round_trip(db):
    values = ODD_TEXTS + [None]
    assert _round_trip(db, pgarray.texts(values), "text") == values


def test_integers_and_numerics_round_trip(db):
    ints = [1, None, -5, 2**63 - 1, 0]
    assert _round_trip(db, pgarray.integers(ints), "bigint") == ints
    nums = [Decimal("0.57"), Decimal("1E+2"), Decimal("1E-7"), Decimal("12345678901.123456789012345678"),
            None, Decimal("-3.10"), 7]
    back = _round_trip(db, pgarray.numerics(nums), "numeric")
    assert back == [None if v is None else Decimal(v) for v in nums]
    assert [None if v is None else str(v) for v in back][:1] == ["0.57"]


def test_empty_and_refusals(db):
    assert _round_trip(db, pgarray.integers([]), "bigint") == []
    assert _round_trip(db, pgarray.texts([]), "text") == []
    for bad in (Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")):
        with pytest.raises(ValueError):
            pgarray.numerics([bad])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                                      blacklist_characters="\x00")))))
def test_any_text_round_trips(db, values):
    assert _round_trip(db, pgarray.texts(values), "text") == values


def test_array_params_only_touches_cast_arrays():
    encode = pgarray.ArrayParams("SELECT CAST(:a AS bigint[]), CAST(:b AS text[]), CAST(:c AS bigint),"
                                 " CAST(:d AS numeric[]), :e")
    out = encode({"a": [1, 2], "b": ['x"'], "c": 5, "d": [Decimal("1.5")], "e": [1]})
    assert out == {"a": "{1,2}", "b": '{"x\\""}', "c": 5, "d": "{1.5}", "e": [1]}
