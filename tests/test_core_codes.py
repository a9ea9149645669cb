"""The package's one table of gRPC status codes (``resilient_grpc.core.codes``)."""

from __future__ import annotations

import grpc
import pytest

from resilient_grpc.core.codes import (
    CODE_NUMBERS,
    STATUS_CODE_NAMES,
    code_name,
    code_number,
    name_and_number,
)


def test_the_table_is_grpcs_own() -> None:
    assert {code.name: code.value[0] for code in grpc.StatusCode} == CODE_NUMBERS
    assert frozenset(CODE_NUMBERS) == STATUS_CODE_NAMES


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_names_numbers_and_enums_agree(code: grpc.StatusCode) -> None:
    number = code.value[0]
    assert code_name(code) == code_name(number) == code_name(code.name.lower()) == code.name
    assert code_number(code) == code_number(number) == code_number(code.name) == number
    assert name_and_number(code.name) == (code.name, number)


def test_code_number_accepts_names_numbers_and_status_codes() -> None:
    assert code_number("UNAVAILABLE") == 14
    assert code_number(grpc.StatusCode.NOT_FOUND) == 5
    assert code_number(4) == 4


@pytest.mark.parametrize("odd", ["nonsense", 17, -1, None, 2.5, True])
def test_telemetry_lookups_report_anything_else_as_unknown(odd: object) -> None:
    assert name_and_number(odd) == ("UNKNOWN", 2)
    assert code_number(odd) == 2
    with pytest.raises(ValueError, match="is not a gRPC status code"):
        code_name(odd)
