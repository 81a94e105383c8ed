import pytest

from lowbit.formats import FORMATS
from lowbit.scheme import PRESETS, Scheme, SchemeError, parse_scheme

# Canonical strings beyond the presets (activation schemes are parsed even before they run).
CANONICAL = PRESETS + ("w8a8", "w8a8g64", "w8g128a8g64-asym", "w8a8-static", "w4a8", "w4a8-static", "w4g128a8-asym", "w8-asym", "w2g16", "nf4g128")


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_strings_print_back_identically(text):
    assert str(parse_scheme(text)) == text
    assert parse_scheme(str(parse_scheme(text))) == parse_scheme(text)


@pytest.mark.parametrize(
    "alias, canonical",
    [("w8", "int8"), ("INT8", "int8"), (" w4g64 ", "w4g64"), ("nf4", "nf4g64"), ("W4G128-ASYM", "w4g128-asym")],
)
def test_aliases_normalise(alias, canonical):
    assert str(parse_scheme(alias)) == canonical


def test_fields():
    s = parse_scheme("w4g128-asym")
    assert (s.format, s.group_size, s.symmetric, s.act_bits) == ("int4", 128, False, None)
    assert s.granularity == "group" and s.bits == 4
    assert parse_scheme("int8").granularity == "channel"
    assert parse_scheme("w8-tensor").granularity == "tensor"
    a = parse_scheme("w8a8-static")
    assert a.act_bits == 8 and a.act_static


@pytest.mark.parametrize(
    "bad",
    ["", "w5g64", "w4g63", "w4g0", "w4g4", "int4x", "fp4", "w4g64-asym-asym", "w4-static", "w4a4", "nf4-asym",
     "fp8g64", "w4g64-tensor", "bf16-asym", "w4g64 asym", "w", "g64"],
)  # fmt: skip
def test_bad_strings_raise_with_the_grammar(bad):
    with pytest.raises(SchemeError) as e:
        parse_scheme(bad)
    assert "scheme :=" in str(e.value)


def test_non_string_rejected():
    with pytest.raises(SchemeError):
        parse_scheme(4)  # type: ignore[arg-type]


def test_presets_cover_every_format_of_the_table():
    # The test loops below run over PRESETS, so every format row gets exercised.
    assert {parse_scheme(p).format for p in PRESETS} == set(FORMATS)


def test_direct_construction_is_validated():
    with pytest.raises(SchemeError):
        Scheme("fp16", group_size=64)
    with pytest.raises(SchemeError):
        Scheme("nf4")
    with pytest.raises(SchemeError):
        Scheme("int4", act_static=True)
