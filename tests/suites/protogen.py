"""Hypothesis strategies for protobuf requests, built from message descriptors alone: any
method of any service gets random messages without a hand-written generator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor as _d
from google.protobuf import message as _message
from google.protobuf import message_factory
from hypothesis import strategies as st

FD = _d.FieldDescriptor
MAX_DEPTH = 3
MAX_REPEATED = 4
HUGE = 100_000

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# Invalid UTF-8 a client can put on the wire where a proto3 string belongs: a CESU-8
# lone surrogate (U+D800), a stray continuation byte, a truncated sequence, > U+10FFFF.
BAD_UTF8 = (b"\xed\xa0\x80", b"\x80", b"\xc3", b"\xff\xfe", b"\xf4\x90\x80\x80", b"a\xc0\xafb")


def message_class(descriptor: _d.Descriptor) -> type[_message.Message]:
    return message_factory.GetMessageClass(descriptor)


def strings(hints: Sequence[str]) -> st.SearchStrategy[str]:
    """Short and huge, plain and exotic text (protobuf itself refuses lone surrogates; the
    wire-level family sends those)."""
    text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
    exotic = st.sampled_from(["", " ", "\x00", "../../etc/passwd", "%s%n", "'; DROP TABLE x;--", "a" * 129,
                              "é" * 300, "\u202e\ufeff", "🦄" * 50, "x/" * 100, "budgets/", "models/",
                              "promptTemplates/../x", "9" * 40, "-1", "NaN", "{{x}}", "{{", "\n\r\t"])
    huge = st.builds(lambda n, c: c * n, st.integers(1_000, HUGE), st.sampled_from(["a", "é", "😀", "/", "{"]))
    options = [text, exotic, huge]
    if hints:
        hinted = st.sampled_from(list(hints))
        options += [hinted, st.builds(lambda h, t: h + t, hinted, text)]
    return st.one_of(*options)


def integers(field: _d.FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = INT_RANGES[field.type]
    edges = [v for v in (0, 1, -1, 2, 5, 100, 1000, 2**31 - 1, -(2**31), 2**32, 2**53 + 1, 2**62, -(2**62), 10**12,
                         -(10**12), low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -10), min(high, 1000)))


def floats(field: _d.FieldDescriptor) -> st.SearchStrategy[float]:
    width = 32 if field.type == FD.TYPE_FLOAT else 64
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 2.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"), 1e9]
    if width == 32:
        edges = [e for e in edges if abs(e) < 3e38 or e != e or abs(e) == float("inf")]
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


def timestamps() -> st.SearchStrategy[dict[str, int]]:
    seconds = st.one_of(st.sampled_from([0, -1, -(10**12), 10**12, 253402300799, 253402300800, -62135596800,
                                         -62135596801, 2**62, -(2**63), 1_700_000_000]),
                        st.integers(-62135596800, 253402300799), st.integers(-(2**63), 2**63 - 1))
    nanos = st.one_of(st.just(0), st.sampled_from([-1, 999_999_999, 1_000_000_000, 2**31 - 1, -(2**31)]),
                      st.integers(0, 999_999_999))
    return st.fixed_dictionaries({"seconds": seconds, "nanos": nanos})


def _scalar(field: _d.FieldDescriptor, hints: Sequence[str]) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_STRING:
        return strings(hints)
    if field.type == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.builds(lambda n: b"\xff" * n, st.integers(1_000, HUGE)))
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return floats(field)
    if field.type == FD.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-5, 100), st.just(2**31 - 1))
    return integers(field)


def _value(field: _d.FieldDescriptor, hints: Sequence[str], depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, hints, depth + 1)
    return _scalar(field, hints)


def _repeated(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    duplicated = st.builds(lambda x, n: [x] * n, element, st.integers(2, MAX_REPEATED))
    return st.one_of(st.lists(element, max_size=MAX_REPEATED), duplicated)


@st.composite
def messages(draw: st.DrawFn, descriptor: _d.Descriptor, hints: Sequence[str] = (), depth: int = 0) -> _message.Message:
    """A random instance of `descriptor`: each field left unset or given an edge or random value."""
    msg = message_class(descriptor)()
    if descriptor.full_name == "google.protobuf.Timestamp":
        stamp = draw(timestamps())
        msg.seconds, msg.nanos = stamp["seconds"], stamp["nanos"]  # type: ignore[attr-defined]
        return msg
    if depth > MAX_DEPTH:
        return msg
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        target = getattr(msg, field.name)
        if _is_map(field):
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.lists(st.tuples(_value(key_f, hints, depth), _value(value_f, hints, depth)),
                                    max_size=MAX_REPEATED))
            for key, value in entries:
                if value_f.type == FD.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
        elif field.is_repeated:
            values = draw(_repeated(_value(field, hints, depth)))
            if field.type == FD.TYPE_MESSAGE:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        elif field.type == FD.TYPE_MESSAGE:
            target.CopyFrom(draw(_value(field, hints, depth)))
        else:
            setattr(msg, field.name, draw(_scalar(field, hints)))
    return msg


def _is_map(field: _d.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def string_paths(descriptor: _d.Descriptor, depth: int = 0) -> list[tuple[_d.FieldDescriptor, ...]]:
    """Every path of fields from `descriptor` to a string field; a map<string, string> field
    ends a path (its values are the strings)."""
    paths: list[tuple[_d.FieldDescriptor, ...]] = []
    for field in descriptor.fields:
        if field.type == FD.TYPE_STRING:
            paths.append((field,))
        elif _is_map(field):
            if field.message_type.fields_by_name["value"].type == FD.TYPE_STRING:
                paths.append((field,))
        elif field.type == FD.TYPE_MESSAGE and depth < 2 and field.message_type.full_name != "google.protobuf.Timestamp":
            paths += [(field, *rest) for rest in string_paths(field.message_type, depth + 1)]
    return paths


def _set_path(msg: _message.Message, path: tuple[_d.FieldDescriptor, ...], value: str) -> None:
    field, rest = path[0], path[1:]
    target = getattr(msg, field.name)
    if _is_map(field):
        target["k"] = value
    elif rest:
        _set_path(target.add() if field.is_repeated else target, rest, value)
    elif field.is_repeated:
        target.append(value)
    else:
        setattr(msg, field.name, value)


@st.composite
def invalid_utf8_requests(draw: st.DrawFn, descriptor: _d.Descriptor, hints: Sequence[str] = ()) -> tuple[bytes, str]:
    """Wire bytes of a request whose one string field holds invalid UTF-8, and a label of it.

    The field is set to a placeholder of the same byte length, serialized, and the
    placeholder swapped for the bad bytes, so every length prefix stays right."""
    path = draw(st.sampled_from(string_paths(descriptor)))
    bad = draw(st.sampled_from(BAD_UTF8))
    prefix = draw(st.sampled_from(["", *hints[:3]]))
    placeholder = "Zq" + "~" * len(bad) + "qZ"
    msg = message_class(descriptor)()
    _set_path(msg, path, prefix + placeholder)
    wire = msg.SerializeToString()
    assert wire.count(placeholder.encode()) == 1
    return wire.replace(placeholder.encode(), b"Zq" + bad + b"qZ"), ".".join(f.name for f in path) + f"={prefix!r}+{bad!r}"


def describe(msg: _message.Message, limit: int = 400) -> str:
    """A one-line text form of `msg` with every long string shown as its length and first characters."""
    short = type(msg)()
    short.CopyFrom(msg)
    _shorten(short)
    text = " ".join(str(short).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _shorten(msg: _message.Message) -> None:
    for field, value in msg.ListFields():
        if field.type == FD.TYPE_STRING and not _is_map(field):
            if field.is_repeated:
                for i, item in enumerate(value):
                    if len(item) > 40:
                        value[i] = f"<{len(item)} chars: {item[:6]}...>"
            elif len(value) > 40:
                setattr(msg, field.name, f"<{len(value)} chars: {value[:6]}...>")
        elif _is_map(field):
            for key in list(value):
                item = value[key]
                if isinstance(item, str) and (len(item) > 40 or len(key) > 40):
                    del value[key]
                    value[f"<{len(key)} chars: {key[:6]}...>"[:60]] = f"<{len(item)} chars: {item[:6]}...>"
                elif not isinstance(item, str | int | float | bool | bytes):
                    _shorten(item)
        elif field.type == FD.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                _shorten(item)
