"""Rows of the store of record as protobuf messages."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval.storage import ChunkRow, DocumentRow


def struct_of(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def chunk_proto(document: str, doc: DocumentRow, chunk: ChunkRow) -> pb.Chunk:
    return pb.Chunk(name=f"{document}/chunks/{chunk.idx}", document=document, index=chunk.idx, text=chunk.text,
                    start_offset=chunk.start_offset, end_offset=chunk.end_offset, token_count=chunk.token_count,
                    document_display_name=doc.display_name, source_uri=doc.source_uri,
                    metadata=struct_of(doc.metadata), heading_path=chunk.heading_path)
