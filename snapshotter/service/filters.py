"""containerd's filter syntax (the `filters` package of containerd 1.6), as `List` receives it.

A filter is a comma-separated list of selectors that must all match (AND); a request carries zero or
more filters and an object is listed when any of them matches (OR); no filter matches everything::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]      no operator: the field must be present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="              "~=" is a regular expression search
    value     := quoted | [^\\s,]+
    quoted    := a double-quoted string with Go escapes; after "~=" also /.../ or |...|

Examples: ``kind==active``, ``name==p,labels.l``, ``labels."containerd.io/gc.root"==x``,
``parent!=""``, ``name~=/^sha256:/``.

Matching follows containerd: ``!=`` is true for an absent field (its value is ""), ``==`` needs the
field present, ``~=`` searches the value (absent: ""). Two deliberate differences: a regular
expression that does not compile is refused at parse time (containerd logs it and matches nothing),
and Python's `re` stands in for Go's RE2 (they agree on the common syntax). Errors are
`InvalidRequestError` (gRPC InvalidArgument) and name the filter, the offset and what was expected.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidRequestError

#: Looks a field path up on the object being filtered: its value, and whether it is present.
FieldLookup = Callable[[Sequence[str]], tuple[str, bool]]

SYNTAX_HINT = 'syntax: field==value[,field!=value][,field~=regex][,field]; quote dotted keys: labels."a.b"==x'


class Op(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


class _Tok(enum.Enum):
    EOF = "end of input"
    QUOTED = "quoted string"
    VALUE = "value"
    FIELD = "field"
    SEPARATOR = "separator"
    OPERATOR = "operator"
    OTHER = "character"


@dataclass(frozen=True)
class _Token:
    kind: _Tok
    pos: int
    text: str  # raw text; for QUOTED the decoded string
    quote: str = ""  # for QUOTED: the quote character used


class FilterSyntaxError(InvalidRequestError):
    """A filter that does not parse; `filter`, `offset` and `why` say where and what."""

    def __init__(self, text: str, offset: int, why: str) -> None:
        self.filter = text
        self.offset = offset
        self.why = why
        super().__init__(f"filter {text!r}: {why} at offset {offset}; {SYNTAX_HINT}")


_QUOTES = '"/|'
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}


def _is_field_char(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    # containerd's isValueRune: not a comma, not space, and a graphic (printable) character.
    return c != "," and not c.isspace() and c.isprintable()


class _Scanner:
    """Tokens of one filter string. After an operator it reads a value, like containerd's scanner."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.after_operator = False

    def peek_char(self) -> str:
        """The next raw character ("" at the end); whitespace is not skipped, as in containerd."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def scan(self) -> _Token:
        text = self.text
        while self.pos < len(text) and text[self.pos].isspace():
            self.pos += 1
        start = self.pos
        if start >= len(text):
            return _Token(_Tok.EOF, start, "")
        c = text[start]
        if c == "\x00":
            raise FilterSyntaxError(text, start, "unexpected NUL character")
        if c in _QUOTES:
            decoded = self._quoted(c)
            return _Token(_Tok.QUOTED, start, decoded, c)
        if c in ",.":
            self.pos += 1
            self.after_operator = False
            return _Token(_Tok.SEPARATOR, start, c)
        if c in "=!~":
            while self.pos < len(text) and text[self.pos] in "=!~":
                self.pos += 1
            self.after_operator = True
            return _Token(_Tok.OPERATOR, start, text[start : self.pos])
        if self.after_operator:
            while self.pos < len(text) and _is_value_char(text[self.pos]):
                self.pos += 1
            self.after_operator = False
            if self.pos == start:  # a control character
                self.pos += 1
                return _Token(_Tok.OTHER, start, c)
            return _Token(_Tok.VALUE, start, text[start : self.pos])
        if _is_field_char(c):
            while self.pos < len(text) and _is_field_char(text[self.pos]):
                self.pos += 1
            return _Token(_Tok.FIELD, start, text[start : self.pos])
        self.pos += 1
        return _Token(_Tok.OTHER, start, c)

    def _quoted(self, quote: str) -> str:
        """Read a quoted string starting at `self.pos` and return it decoded (Go escapes)."""
        text, start = self.text, self.pos
        i = start + 1
        out: list[str] = []
        while True:
            if i >= len(text) or text[i] == "\n":
                raise FilterSyntaxError(text, start, "quoted literal not terminated")
            c = text[i]
            if c == quote:
                self.pos = i + 1
                return "".join(out)
            if c != "\\":
                out.append(c)
                i += 1
                continue
            e = text[i + 1] if i + 1 < len(text) else ""
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 2
            elif e == quote:
                out.append(quote)
                i += 2
            elif e in "01234567" and e:
                digits = text[i + 1 : i + 4]
                if len(digits) < 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
                    raise FilterSyntaxError(text, i, "illegal octal escape sequence")
                out.append(chr(int(digits, 8)))
                i += 4
            elif e in ("x", "u", "U"):
                n = {"x": 2, "u": 4, "U": 8}[e]
                digits = text[i + 2 : i + 2 + n]
                if len(digits) < n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise FilterSyntaxError(text, i, "illegal numeric escape sequence")
                value = int(digits, 16)
                if value > 0x10FFFF:
                    raise FilterSyntaxError(text, i, "escape sequence is not a valid code point")
                out.append(chr(value))
                i += 2 + n
            else:
                raise FilterSyntaxError(text, i, "illegal escape sequence")


@dataclass(frozen=True)
class Selector:
    """One `fieldpath [op value]` term."""

    fieldpath: tuple[str, ...]
    op: Op
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, lookup: FieldLookup) -> bool:
        value, present = lookup(self.fieldpath)
        if self.op is Op.PRESENT:
            return present
        if self.op is Op.EQUAL:
            return present and value == self.value
        if self.op is Op.NOT_EQUAL:
            return value != self.value
        assert self.regex is not None  # set by the parser for MATCHES
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Filters OR-ed, each a tuple of selectors AND-ed. No filters at all: match everything."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, lookup: FieldLookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(lookup) for s in selectors) for selectors in self.alternatives)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, why: str) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, pos, why)

    def selectors(self) -> tuple[Selector, ...]:
        out = [self.selector()]
        while True:
            c = self.scanner.peek_char()
            if c == "":
                return tuple(out)
            if c != ",":
                raise self.error(self.scanner.pos, f"unexpected input {c!r} (expected ',' or the end)")
            self.scanner.scan()
            out.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.scanner.peek_char() in ("", ","):
            return Selector(fieldpath, Op.PRESENT)
        tok = self.scanner.scan()
        if tok.kind is not _Tok.OPERATOR:
            raise self.error(tok.pos, 'expected an operator ("==", "!=" or "~=")')
        try:
            op = Op(tok.text)
        except ValueError:
            raise self.error(tok.pos, f"unsupported operator {tok.text!r}") from None
        tok = self.scanner.scan()
        if tok.kind in (_Tok.VALUE, _Tok.FIELD):
            value = tok.text
        elif tok.kind is _Tok.QUOTED:
            if op is not Op.MATCHES and tok.quote != '"':
                raise self.error(tok.pos, 'invalid quote encountered (only "..." outside a ~= value)')
            value = tok.text
        elif tok.kind is _Tok.EOF:
            raise self.error(tok.pos, "unexpected end of input (expected a value)")
        else:
            raise self.error(tok.pos, "expected a value or a quoted string")
        if op is not Op.MATCHES:
            return Selector(fieldpath, op, value)
        try:
            regex = re.compile(value)
        except re.error as e:
            raise self.error(tok.pos, f"invalid regular expression {value!r}: {e}") from None
        return Selector(fieldpath, op, value, regex)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.scanner.peek_char() == ".":
            self.scanner.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        tok = self.scanner.scan()
        if tok.kind is _Tok.FIELD:
            return tok.text
        if tok.kind is _Tok.QUOTED:
            if tok.quote != '"':
                raise self.error(tok.pos, 'invalid quote encountered (field names use "...")')
            return tok.text
        if tok.kind is _Tok.EOF:
            raise self.error(tok.pos, "unexpected end of input (expected a field)")
        raise self.error(tok.pos, f"expected a field or a quoted string, got {tok.text!r}")


def parse(text: str) -> tuple[Selector, ...]:
    """One filter string: its selectors (all must match). The empty string matches everything."""
    if text == "":
        return ()
    return _Parser(text).selectors()


def parse_all(filters: Iterable[str]) -> Filter:
    """The filters of one request (any may match); raises `FilterSyntaxError` on the first bad one."""
    return Filter(tuple(parse(f) for f in filters))


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> FieldLookup:
    """The fields a snapshot exposes to filters: name, parent, kind (active/view/committed), labels.*.

    Like containerd, ``parent`` is present (possibly "") on every snapshot, and ``labels.a.b`` looks up
    the label ``a.b`` (the rest of the path joined by dots).
    """

    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "kind":
            return kind, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return lookup
