"""Conventions every contract under protos/ must follow, checked on the generated code.

The checks walk every module under `llmo.protos`, so each service's contract is
checked as soon as its generated code lands. Each checker returns a list of
violations; the checkers are also run on deliberately broken descriptors to show
they catch what they claim to.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

import llmo.protos
from llmo.protos.events.v1 import events_pb2

REPO = Path(__file__).resolve().parents[3]
DOMAINS = {"router", "inference", "retrieval", "evaluation", "visibility", "cost"}
SUBJECT = re.compile(r"^llmo\.(?P<domain>[a-z][a-z0-9_]*)\.v1\.(?P<name>[a-z][a-z0-9_]*)$")
# Contracts written with their error reasons documented RPC by RPC.
DOCUMENTED_ERRORS = ("retrieval", "evaluation", "visibility")
STATUS_CODES = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "PERMISSION_DENIED",
    "OUT_OF_RANGE",
}


def _generated_modules() -> list[ModuleType]:
    modules = []
    for info in pkgutil.walk_packages(llmo.protos.__path__, prefix="llmo.protos."):
        modules.append(importlib.import_module(info.name))
    return modules


def _files() -> list[FileDescriptor]:
    return [m.DESCRIPTOR for m in _generated_modules() if m.__name__.endswith("_pb2")]


def _services() -> list[ServiceDescriptor]:
    return [s for f in _files() for s in f.services_by_name.values()]


def _messages(container: FileDescriptor | Descriptor) -> Iterator[Descriptor]:
    children = (
        container.message_types_by_name.values()
        if isinstance(container, FileDescriptor)
        else container.nested_types
    )
    for message in children:
        yield message
        yield from _messages(message)


def _enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()
    for message in _messages(file):
        yield from message.enum_types


def _field_problem(message: Descriptor, name: str, kind: int) -> str | None:
    field = message.fields_by_name.get(name)
    if field is None:
        return f"{message.full_name} lacks `{name}`"
    if field.type != kind or field.is_repeated:
        return f"{message.full_name}.{name} has the wrong type"
    return None


def pagination_violations(service: ServiceDescriptor) -> list[str]:
    problems = []
    for method in service.methods:
        if not method.name.startswith("List"):
            continue
        checks = [
            (method.input_type, "page_size", FieldDescriptor.TYPE_INT32),
            (method.input_type, "page_token", FieldDescriptor.TYPE_STRING),
            (method.output_type, "next_page_token", FieldDescriptor.TYPE_STRING),
        ]
        problems += [p for m, n, k in checks if (p := _field_problem(m, n, k))]
    return problems


def enum_zero_violations(file: FileDescriptor) -> list[str]:
    problems = []
    for enum in _enums(file):
        zero = enum.values_by_number.get(0)
        if zero is None or not zero.name.endswith("_UNSPECIFIED"):
            problems.append(f"{enum.full_name}: zero value must end in _UNSPECIFIED")
    return problems


def subject_violations(message_name: str, subject: str) -> list[str]:
    match = SUBJECT.match(subject)
    if match is None:
        return [f"{message_name}: subject {subject!r} is not llmo.<domain>.v1.<name>"]
    if match["domain"] not in DOMAINS:
        return [f"{message_name}: subject {subject!r} names unknown domain {match['domain']!r}"]
    return []


def service_naming_violations(service: ServiceDescriptor) -> list[str]:
    package = service.file.package
    match = re.fullmatch(r"llmo\.([a-z]+)\.v1", package)
    if match is None:
        return [f"{service.full_name}: package {package!r} is not llmo.<domain>.v1"]
    expected = f"{match[1].capitalize()}Service"
    if service.name != expected:
        return [f"{service.full_name}: service in {package} must be named {expected}"]
    return []


def _subjects() -> dict[str, str]:
    subjects = {}
    for message in events_pb2.DESCRIPTOR.message_types_by_name.values():
        options = message.GetOptions()
        if options.HasExtension(events_pb2.subject):
            subjects[message.full_name] = options.Extensions[events_pb2.subject]
    return subjects


def _synthetic_file(name: str, build: descriptor_pb2.FileDescriptorProto) -> FileDescriptor:
    pool = descriptor_pool.DescriptorPool()
    build.name = name
    pool.Add(build)
    return pool.FindFileByName(name)


def _bad_contract() -> FileDescriptor:
    proto = descriptor_pb2.FileDescriptorProto(package="llmo.broken.v1", syntax="proto3")
    request = proto.message_type.add(name="ListThingsRequest")
    request.field.add(
        name="page_size", number=1, type=FieldDescriptor.TYPE_STRING, label=FieldDescriptor.LABEL_OPTIONAL
    )
    proto.message_type.add(name="ListThingsResponse")
    enum = proto.enum_type.add(name="Color")
    enum.value.add(name="COLOR_RED", number=0)
    nested = proto.message_type[1].enum_type.add(name="Shade")
    nested.value.add(name="SHADE_UNSPECIFIED", number=0)
    service = proto.service.add(name="WrongName")
    service.method.add(
        name="ListThings",
        input_type=".llmo.broken.v1.ListThingsRequest",
        output_type=".llmo.broken.v1.ListThingsResponse",
    )
    return _synthetic_file("llmo/broken/v1/broken.proto", proto)


def test_every_generated_module_imports() -> None:
    names = {m.__name__ for m in _generated_modules()}
    for domain in ("common", "events", *DOCUMENTED_ERRORS):
        assert any(n.startswith(f"llmo.protos.{domain}.v1.") for n in names), domain


def test_generated_modules_cover_every_proto_file() -> None:
    generated = {f.name for f in _files()}
    on_disk = {str(p.relative_to(REPO / "protos")) for p in (REPO / "protos").rglob("*.proto")}
    assert on_disk <= generated


def test_every_list_rpc_is_paginated() -> None:
    services = _services()
    assert {s.full_name for s in services} >= {
        "llmo.retrieval.v1.RetrievalService",
        "llmo.evaluation.v1.EvaluationService",
        "llmo.visibility.v1.VisibilityService",
    }
    lists = [m for s in services for m in s.methods if m.name.startswith("List")]
    assert len(lists) >= 10
    assert [v for s in services for v in pagination_violations(s)] == []


def test_services_are_named_after_their_package() -> None:
    assert [v for s in _services() for v in service_naming_violations(s)] == []


def test_enum_zero_values_are_unspecified() -> None:
    files = _files()
    assert sum(1 for f in files for _ in _enums(f)) >= 15
    assert [v for f in files for v in enum_zero_violations(f)] == []


def test_event_subjects_follow_the_convention() -> None:
    subjects = _subjects()
    assert len(subjects) >= 7
    assert [v for name, s in subjects.items() for v in subject_violations(name, s)] == []
    assert len(set(subjects.values())) == len(subjects), "two events share a subject"


def test_every_event_with_a_subject_carries_an_event_id() -> None:
    for name in _subjects():
        message = events_pb2.DESCRIPTOR.pool.FindMessageTypeByName(name)
        assert _field_problem(message, "event_id", FieldDescriptor.TYPE_STRING) is None, name


def test_every_service_has_a_client_stub() -> None:
    for service in _services():
        grpc_module = importlib.import_module(
            "llmo.protos."
            + service.file.name.removeprefix("llmo/").removesuffix(".proto").replace("/", ".")
            + "_pb2_grpc"
        )
        assert hasattr(grpc_module, f"{service.name}Stub"), service.full_name
        assert hasattr(grpc_module, f"{service.name}Servicer"), service.full_name


def test_checkers_catch_broken_contracts() -> None:
    broken = _bad_contract()
    service = broken.services_by_name["WrongName"]
    assert sorted(pagination_violations(service)) == [
        "llmo.broken.v1.ListThingsRequest lacks `page_token`",
        "llmo.broken.v1.ListThingsRequest.page_size has the wrong type",
        "llmo.broken.v1.ListThingsResponse lacks `next_page_token`",
    ]
    assert enum_zero_violations(broken) == ["llmo.broken.v1.Color: zero value must end in _UNSPECIFIED"]
    assert service_naming_violations(service) == [
        "llmo.broken.v1.WrongName: service in llmo.broken.v1 must be named BrokenService"
    ]


@pytest.mark.parametrize(
    "subject",
    [
        "llmo.cost.completed",
        "llmo.cost.v2.completed",
        "cost.v1.completed",
        "llmo.Cost.v1.done",
        "llmo.x.v1.done",
    ],
)
def test_subject_checker_rejects_bad_subjects(subject: str) -> None:
    assert subject_violations("llmo.events.v1.Bad", subject) != []


def _rpc_comments(proto: Path) -> dict[str, str]:
    """Maps each RPC of a .proto file to the comment block just above it."""
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in proto.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            block.append(stripped[2:].strip())
            continue
        match = re.match(r"rpc (\w+)\(", stripped)
        if match:
            comments[match[1]] = "\n".join(block)
        block = []
    return comments


@pytest.mark.parametrize("domain", DOCUMENTED_ERRORS)
def test_every_rpc_documents_its_error_reasons(domain: str) -> None:
    proto = REPO / "protos" / "llmo" / domain / "v1" / f"{domain}_service.proto"
    comments = _rpc_comments(proto)
    service = next(s for s in _services() if s.file.name == f"llmo/{domain}/v1/{domain}_service.proto")
    assert set(comments) == {m.name for m in service.methods}
    for rpc, comment in comments.items():
        assert "errors:" in comment.lower(), f"{domain} {rpc} documents no errors"
        codes = STATUS_CODES & set(re.findall(r"\b[A-Z_]{4,}\b", comment))
        assert codes, f"{domain} {rpc} names no canonical status code"
        reasons = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", comment)) - STATUS_CODES
        assert reasons, f"{domain} {rpc} names no ErrorInfo reason"
