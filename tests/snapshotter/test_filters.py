"""containerd's filter syntax: parsing, matching, and the errors a bad filter gets."""

from __future__ import annotations

import pytest

from snapshotter.errors import InvalidRequestError
from snapshotter.service.filters import (
    FieldLookup,
    FilterSyntaxError,
    Op,
    Selector,
    parse,
    parse_all,
    snapshot_fields,
)


def fields(name: str, parent: str = "", kind: str = "active", **labels: str) -> FieldLookup:
    return snapshot_fields(name, parent, kind, labels)


def test_selectors_parse_into_fieldpath_operator_value() -> None:
    assert parse("name==foo") == (Selector(("name",), Op.EQUAL, "foo"),)
    assert parse("parent!=x") == (Selector(("parent",), Op.NOT_EQUAL, "x"),)
    assert parse("labels.l") == (Selector(("labels", "l"), Op.PRESENT),)
    assert parse('labels."containerd.io/gc.root"==check') == (
        Selector(("labels", "containerd.io/gc.root"), Op.EQUAL, "check"),
    )
    assert parse("a.b.c==1.2.3") == (Selector(("a", "b", "c"), Op.EQUAL, "1.2.3"),)
    assert parse("name==a=b") == (Selector(("name",), Op.EQUAL, "a=b"),)
    assert parse(" name == foo") == (Selector(("name",), Op.EQUAL, "foo"),)


def test_quoted_values_use_go_escapes() -> None:
    assert parse('name==""')[0].value == ""
    assert parse(r'name=="a\"b\\c\n\x41\u00e9\101"')[0].value == 'a"b\\c\nA\u00e9A'
    assert parse('name=="a,b c"')[0].value == "a,b c"


def test_regex_values_may_use_slashes_or_pipes() -> None:
    (s,) = parse("name~=/^sha256:[0-9a-f]+$/")
    assert s.op is Op.MATCHES and s.value == "^sha256:[0-9a-f]+$"
    assert parse("name~=|a/b|")[0].value == "a/b"
    assert parse('name~="^x"')[0].value == "^x"
    assert parse("name~=^x.*")[0].value == "^x.*"


def test_comma_is_and_several_filters_are_or() -> None:
    f = parse_all(["kind==active,labels.l==2", "name==p"])
    assert f.match(fields("a", kind="active", l="2"))
    assert not f.match(fields("a", kind="view", l="2"))
    assert not f.match(fields("a", kind="active", l="3"))
    assert f.match(fields("p", kind="committed"))


def test_no_filter_or_an_empty_one_matches_everything() -> None:
    assert parse_all([]).match(fields("x"))
    assert parse_all([""]).match(fields("x"))
    assert parse("") == ()


def test_matching_follows_containerd_for_absent_fields() -> None:
    bare = fields("x")
    assert not parse_all(["labels.l"]).match(bare)
    assert not parse_all(["labels.l==''"]).match(bare)
    assert parse_all(["labels.l!=1"]).match(bare)  # absent reads as "", which is != "1"
    assert parse_all(['labels.l!=""']).match(fields("x", l="1"))
    assert not parse_all(["unknown==x"]).match(bare)
    assert parse_all(['parent==""']).match(bare)  # parent is always present
    assert not parse_all(["labels"]).match(fields("x", l="1"))  # no key: absent
    assert parse_all(["name~=^x$"]).match(bare)
    assert not parse_all(["name~=^y"]).match(bare)
    assert parse_all(["name~=b"]).match(fields("abc"))  # a search, not a full match


def test_dotted_label_keys_join_the_rest_of_the_path() -> None:
    labels = fields("x", **{"a.b": "1"})
    assert parse_all(['labels."a.b"==1']).match(labels)
    assert parse_all(["labels.a.b==1"]).match(labels)  # containerd joins the path with dots


def test_walk_table_of_containerds_suite() -> None:
    gc = {"containerd.io/gc.root": "check-walk"}
    snaps = {
        "a-np": ("", "active", gc),
        "p": ("", "committed", gc),
        "a": ("p", "active", gc),
        "v": ("p", "view", gc),
        "p-wl": ("", "committed", {**gc, "l": "1"}),
        "a-wl": ("p-wl", "active", {**gc, "l": "2"}),
        "v-wl": ("p-wl", "view", {**gc, "l": "3"}),
        "a-np-wl": ("", "active", {**gc, "l": "2"}),
    }
    cases = [
        (['labels."containerd.io/gc.root"==check-walk'], sorted(snaps)),
        (['kind==active,labels."containerd.io/gc.root"==check-walk'], ["a", "a-np", "a-np-wl", "a-wl"]),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
        (["name==p", "name==a-np-wl"], ["a-np-wl", "p"]),
        (["name==a-wl,labels.l"], ["a-wl"]),
        (["parent==p"], ["a", "v"]),
        (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "a-wl", "v", "v-wl"]),
        (["labels.l"], ["a-np-wl", "a-wl", "p-wl", "v-wl"]),
        (["labels.l==2"], ["a-np-wl", "a-wl"]),
    ]
    for filters, expected in cases:
        flt = parse_all(filters)
        got = sorted(n for n, (p, k, lab) in snaps.items() if flt.match(snapshot_fields(n, p, k, lab)))
        assert got == expected, filters


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("name==", "expected a value"),
        ("name=x", "unsupported operator"),
        ("name===x", "unsupported operator"),
        ("name x", "expected an operator"),
        ("name==a b", "unexpected input"),
        ("name==a,", "expected a field"),
        (",name==a", "expected a field"),
        ("labels.", "expected a field"),
        ('labels."open', "not terminated"),
        ('name=="bad\\q"', "illegal escape"),
        ('name=="\\x4"', "illegal numeric escape"),
        ("name==/x/", "invalid quote"),
        ("/x/==a", "invalid quote"),
        ("name~=/[/", "invalid regular expression"),
        ("-x==1", "expected a field"),
        ("name==\x00", "NUL"),
    ],
)
def test_bad_syntax_is_an_invalid_argument_naming_the_offset(text: str, why: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_all(["kind==active", text])
    err = info.value
    assert isinstance(err, InvalidRequestError)
    assert why in str(err)
    assert err.filter == text
    assert 0 <= err.offset <= len(text)
    assert "syntax:" in str(err)  # the remedy
