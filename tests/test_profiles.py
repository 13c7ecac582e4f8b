import pytest

from cuma.profiles import (
    COMMUNITY_ALIGNMENT_FIELD_MAP,
    FIELD_MAPS,
    PRISM_FIELD_MAP,
    PROFILE_FIELDS,
    WVB_FIELD_MAP,
    Profile,
    is_missing,
    normalize_value,
)


def test_canonical_sentence():
    p = Profile(country="Egypt", age_group="25-34 years old", gender="Female", religion="Muslim")
    assert p.to_text() == "Country: Egypt. Age group: 25-34 years old. Gender: Female. Religion: Muslim."
    assert str(p) == p.to_text()


def test_fixed_order_regardless_of_keyword_order():
    a = Profile(religion="Muslim", country="Egypt", language="Arabic", gender="Male")
    b = Profile(gender="Male", language="Arabic", country="Egypt", religion="Muslim")
    assert a.to_text() == b.to_text() == "Country: Egypt. Gender: Male. Religion: Muslim. Language: Arabic."


def test_all_fields_in_declared_order():
    values = {name: f"v{i}" for i, name in enumerate(PROFILE_FIELDS)}
    text = Profile(**values).to_text()
    positions = [text.index(f"v{i}.") for i in range(len(PROFILE_FIELDS))]
    assert positions == sorted(positions)
    assert text.startswith("Country: v0. Age group: v1. Gender: v2. Education: v3. Religion: v4.")
    assert "Marital status: v7. Social class: v8. Income: v9. Language: v10." in text


def test_values_are_stripped_and_whitespace_normalised():
    p = Profile(country="  Egypt \n", education="Upper   secondary.", income=3)
    assert p.country == "Egypt"
    assert p.education == "Upper secondary"
    assert p.income == "3"
    assert p.to_text() == "Country: Egypt. Education: Upper secondary. Income: 3."


def test_empty_profile():
    assert Profile().to_text() == ""
    assert Profile().is_empty()
    assert Profile(country="Don't know").is_empty()


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", float("nan"), "NaN", "-1", "-2", -1, -5.0, "Don't know", "don\u2019t know", "No answer",
     "Missing", "Missing; Not available", "Not asked", "-1. Don't know", "Prefer not to say", "N/A"],
)
def test_missing_codes_are_dropped(value):
    assert is_missing(value)
    assert Profile(country="Peru", religion=value).to_text() == "Country: Peru."


@pytest.mark.parametrize("value", ["None", "No religion", "0", 0, "1", "18-24", "Not employed"])
def test_real_answers_are_kept(value):
    assert not is_missing(value)
    assert Profile(religion=value).religion == str(value)


def test_numbers_render_without_spurious_decimals():
    assert normalize_value(25.0) == "25"
    assert normalize_value(2.5) == "2.5"
    np = pytest.importorskip("numpy")
    assert normalize_value(np.int64(7)) == "7"
    assert normalize_value(np.float64("nan")) is None


@pytest.mark.parametrize("bad", [["Egypt"], {"a": 1}, True, object(), float("inf")])
def test_bad_types_raise_value_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="country"):
        Profile(country=bad)


def test_extra_fields_render_sorted_after_typed_fields():
    p = Profile(country="Chile", extra={"zodiac_sign": "Leo", "political_leaning": "Centre", "x": None})
    assert p.extra == {"political_leaning": "Centre", "zodiac_sign": "Leo"}
    assert p.to_text() == "Country: Chile. Political leaning: Centre. Zodiac sign: Leo."


def test_extra_validation():
    with pytest.raises(ValueError, match="extra"):
        Profile(extra=["not", "a", "mapping"])
    with pytest.raises(ValueError, match="country"):
        Profile(extra={"country": "Chile"})
    with pytest.raises(ValueError, match="extra.tags"):
        Profile(extra={"tags": ["a"]})


def test_equality_hash_and_determinism():
    a = Profile(country="Egypt", extra={"b": "2", "a": "1"})
    b = Profile(country="Egypt ", extra={"a": "1", "b": "2"})
    c = Profile(country="Egypt", religion="No answer", extra={"a": "1", "b": "2", "c": ""})
    assert a == b == c
    assert len({a, b, c}) == 1
    assert a.to_text() == b.to_text() == c.to_text()


def test_frozen():
    p = Profile(country="Egypt")
    with pytest.raises(Exception):
        p.country = "Peru"
    assert p.replace(country="Peru").country == "Peru"


def test_dict_round_trip():
    p = Profile(country="Japan", age_group="65+", extra={"political_leaning": "Right"})
    assert Profile.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="nationality"):
        Profile.from_dict({"nationality": "Japanese"})


def test_wvb_field_map():
    record = {
        "D_INTERVIEW": 123,
        "B_COUNTRY": "Egypt",
        "X003R": "25-34",
        "Q260": "Female",
        "Q275": "Upper secondary education (ISCED 3)",
        "Q273": "Married",
        "Q289": "Muslim",
        "Q290": "Arab",
        "Q279": "Don't know",
        "Q288": "High income",  # not in the map
    }
    p = Profile.from_mapping(record, WVB_FIELD_MAP)
    assert p == Profile(
        country="Egypt",
        age_group="25-34",
        gender="Female",
        education="Upper secondary education (ISCED 3)",
        marital_status="Married",
        religion="Muslim",
        ethnicity="Arab",
    )
    assert p.employment is None
    assert p.income is None
    assert Profile.from_record(record, "wvb") == p


def test_prism_field_map_with_nested_and_flattened_paths():
    nested = {
        "user_id": "u1",
        "reside_country": "United Kingdom",
        "age": "25-34 years old",
        "gender": "Male",
        "education": "University Bachelors Degree",
        "religion": {"self_described": "atheist", "categorised": "No Affiliation", "simplified": "No religion"},
        "ethnicity": {"self_described": "white", "simplified": "White"},
        "employment_status": "Working full-time",
    }
    p = Profile.from_mapping(nested, PRISM_FIELD_MAP)
    assert p.religion == "No religion"
    assert p.ethnicity == "White"
    assert p.employment == "Working full-time"
    assert p.to_text() == (
        "Country: United Kingdom. Age group: 25-34 years old. Gender: Male. Education: University Bachelors Degree. "
        "Religion: No religion. Ethnicity: White. Employment: Working full-time."
    )
    flat = {k: v for k, v in nested.items() if k not in ("religion", "ethnicity")}
    flat["religion.simplified"] = "No religion"
    flat["ethnicity.simplified"] = "White"
    assert Profile.from_mapping(flat, PRISM_FIELD_MAP) == p


def test_prism_nested_mapping_without_path_is_an_error():
    with pytest.raises(ValueError, match="religion"):
        Profile.from_mapping({"religion": {"simplified": "Christian"}}, {"religion": "religion"})


def test_community_alignment_field_map():
    assert len(COMMUNITY_ALIGNMENT_FIELD_MAP) == 6
    assert all(k.startswith("annotator_") for k in COMMUNITY_ALIGNMENT_FIELD_MAP)
    record = {
        "annotator_age": "35-44",
        "annotator_gender": "Female",
        "annotator_education_level": "Some post-secondary",
        "annotator_political": "Somewhat left-leaning",
        "annotator_ethnicity": "Hispanic or Latino",
        "annotator_country": "Mexico",
        "first_turn_prompt": "hi",
    }
    p = Profile.from_record(record, "community_alignment")
    assert p.to_text() == (
        "Country: Mexico. Age group: 35-44. Gender: Female. Education: Some post-secondary. "
        "Ethnicity: Hispanic or Latino. Political leaning: Somewhat left-leaning."
    )


def test_from_mapping_validation():
    with pytest.raises(ValueError, match="nationality"):
        Profile.from_mapping({"a": "x"}, {"a": "nationality"})
    with pytest.raises(ValueError, match="mapping"):
        Profile.from_mapping(["not", "a", "record"], WVB_FIELD_MAP)
    with pytest.raises(ValueError, match="dataset"):
        Profile.from_record({}, "unknown-dataset")
    with pytest.raises(ValueError, match="age_group"):
        Profile.from_mapping({"X003R": [25, 34]}, WVB_FIELD_MAP)


def test_first_present_source_wins_for_a_shared_target():
    field_map = {"country_a": "country", "country_b": "country"}
    assert Profile.from_mapping({"country_a": "-1", "country_b": "Peru"}, field_map).country == "Peru"
    assert Profile.from_mapping({"country_a": "Chile", "country_b": "Peru"}, field_map).country == "Chile"


def test_field_maps_registry():
    assert set(FIELD_MAPS) == {"wvb", "prism", "community_alignment"}
    assert len(WVB_FIELD_MAP) == 8
