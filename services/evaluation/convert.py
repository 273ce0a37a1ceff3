"""Rows of the store as the contract's messages, and the checks on examples a client sends."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping

from google.protobuf import json_format

from llmo.core.errors import invalid_argument
from llmo.core.resources import timestamp
from llmo.evaluation.scoring import MAX_CONTEXTS, MAX_TEXT
from llmo.evaluation.storage import DatasetRow, ExampleRow, GateRow, RubricRow, RunRow
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

MAX_HUMAN_SCORES = 32
MAX_METADATA_BYTES = 16 * 1024
MAX_LABELS = 64
MAX_DISPLAY_NAME = 1024
MAX_DESCRIPTION = 16_384


def new_etag() -> str:
    return uuid.uuid4().hex


def usd(micros: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", micros=int(micros))


def dataset_proto(row: DatasetRow) -> pb.Dataset:
    return pb.Dataset(name=f"datasets/{row.dataset_id}", display_name=row.display_name, description=row.description,
                      labels=row.labels, example_count=row.example_count, create_time=timestamp(row.create_us),
                      update_time=timestamp(row.update_us), etag=row.etag)


def example_proto(dataset_id: str, row: ExampleRow) -> pb.Example:
    example = pb.Example.FromString(row.body)
    example.name = f"datasets/{dataset_id}/examples/{row.example_id}"
    if row.create_us:
        example.create_time.CopyFrom(timestamp(row.create_us))
        example.update_time.CopyFrom(timestamp(row.update_us))
    return example


def example_body(example: pb.Example) -> bytes:
    """What the store keeps of an example: its content, without name and timestamps."""
    content = pb.Example()
    content.CopyFrom(example)
    for output_only in ("name", "create_time", "update_time"):
        content.ClearField(output_only)
    return content.SerializeToString(deterministic=True)


def check_example(example: pb.Example, field: str = "example") -> None:
    """INVALID_ARGUMENT EMPTY_INPUT or FIELD_TOO_LONG naming the field at fault."""
    if not example.input.strip():
        raise invalid_argument("EMPTY_INPUT", f"{field}.input is required", field=f"{field}.input")
    for name in ("input", "output", "reference"):
        if len(getattr(example, name)) > MAX_TEXT:
            raise invalid_argument("FIELD_TOO_LONG", f"{field}.{name} is longer than {MAX_TEXT} characters",
                                   field=f"{field}.{name}")
    if len(example.contexts) > MAX_CONTEXTS:
        raise invalid_argument("FIELD_TOO_LONG", f"{field}.contexts holds more than {MAX_CONTEXTS} contexts",
                               field=f"{field}.contexts")
    for i, context in enumerate(example.contexts):
        if len(context) > MAX_TEXT:
            raise invalid_argument("FIELD_TOO_LONG", f"{field}.contexts[{i}] is longer than {MAX_TEXT} characters",
                                   field=f"{field}.contexts[{i}]")
    if len(example.human_scores) > MAX_HUMAN_SCORES:
        raise invalid_argument("FIELD_TOO_LONG", f"{field}.human_scores holds more than {MAX_HUMAN_SCORES} labels",
                               field=f"{field}.human_scores")
    for key, value in example.human_scores.items():
        if not key or len(key) > 64 or not math.isfinite(value):
            raise invalid_argument("INVALID_HUMAN_SCORE", f"{field}.human_scores needs keys of 1..64 characters and "
                                   "finite values", field=f"{field}.human_scores")
    metadata = json.dumps(json_format.MessageToDict(example.metadata))
    if len(metadata) > MAX_METADATA_BYTES:
        raise invalid_argument("FIELD_TOO_LONG", f"{field}.metadata is larger than {MAX_METADATA_BYTES} bytes",
                               field=f"{field}.metadata")


def check_dataset_fields(dataset: pb.Dataset) -> None:
    if len(dataset.display_name) > MAX_DISPLAY_NAME or len(dataset.description) > MAX_DESCRIPTION:
        raise invalid_argument("FIELD_TOO_LONG", f"display_name is at most {MAX_DISPLAY_NAME} characters and "
                               f"description at most {MAX_DESCRIPTION}", field="dataset")
    check_labels(dataset.labels, "dataset.labels")


def check_labels(labels: Mapping[str, str], field: str) -> None:
    items = dict(labels)
    if len(items) > MAX_LABELS or any(not k or len(k) > 63 or len(v) > 256 for k, v in items.items()):
        raise invalid_argument("INVALID_LABELS", f"{field}: at most {MAX_LABELS} labels, keys 1..63 characters, "
                               "values at most 256", field=field)


def gate_proto(row: GateRow) -> pb.Gate:
    gate = pb.Gate.FromString(row.body)
    gate.name = f"gates/{row.gate_id}"
    gate.create_time.CopyFrom(timestamp(row.create_us))
    gate.update_time.CopyFrom(timestamp(row.update_us))
    gate.etag = row.etag
    return gate


def rubric_proto(row: RubricRow, steps: list[str] | None) -> pb.RubricVersion:
    rubric = pb.Rubric.FromString(row.body)
    return pb.RubricVersion(name=f"rubrics/{row.rubric_id}@{row.version}", version=row.version, rubric=rubric,
                            evaluation_steps=list(rubric.evaluation_steps) or steps or [],
                            create_time=timestamp(row.create_us))


def run_proto(row: RunRow) -> pb.Run:
    run = pb.Run.FromString(row.spec)
    run.name = f"runs/{row.run_id}"
    run.state = row.state  # type: ignore[assignment]
    run.progress.CopyFrom(pb.RunProgress(examples_total=row.examples_total,
                                         examples_completed=row.examples_completed,
                                         examples_failed=row.examples_failed))
    if row.outcome:
        outcome = pb.Run.FromString(row.outcome)
        run.summaries.extend(outcome.summaries)
        run.gate_results.extend(outcome.gate_results)
    run.error_reason, run.error_message = row.error_reason, row.error_message
    run.usage.CopyFrom(common_pb2.Usage(input_tokens=row.input_tokens, output_tokens=row.output_tokens))
    run.cost.CopyFrom(usd(row.cost_micros))
    run.create_time.CopyFrom(timestamp(row.create_us))
    if row.start_us:
        run.start_time.CopyFrom(timestamp(row.start_us))
    if row.end_us:
        run.end_time.CopyFrom(timestamp(row.end_us))
    return run
