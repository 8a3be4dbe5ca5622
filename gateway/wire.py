"""Gateway requests parsed from their wire bytes with their size checked first: a PredictBatch is
counted before any request is parsed, then parsed request by request (protobuf holds the GIL for
the whole of one parse, so small steps let the event loop run between them), and a string list
too long to take is refused before protobuf would turn each of its strings into an object."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import DecodeError

from chassis.errors import InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from gateway.limits import Limits

_REQUESTS = pb.PredictBatchRequest.DESCRIPTOR.fields_by_name["requests"].number
_FEATURES = pb.PredictRequest.DESCRIPTOR.fields_by_name["features"].number
_MAP_KEY, _MAP_VALUE = 1, 2
_STRING_LIST = values_pb2.Value.DESCRIPTOR.fields_by_name["string_list"].number
_LIST_ITEM = values_pb2.StringList.DESCRIPTOR.fields_by_name["values"].number
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
# Each string of a list costs at least a tag and a length byte on the wire.
_MIN_STRING_BYTES = 2


def _varint(data: bytes | memoryview, offset: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if offset >= end:
            raise InvalidArgument("request: the message is truncated inside a varint")
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, offset
        shift += 7
    raise InvalidArgument("request: a varint is longer than 10 bytes")


def fields(data: bytes | memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(field number, payload start, payload end) of each field of the message in data[start:end]."""
    offset, end = start, len(data) if end is None else end
    while offset < end:
        key, offset = _varint(data, offset, end)
        number, wire_type = key >> 3, key & 7
        payload = offset
        if wire_type == _VARINT:
            _, offset = _varint(data, offset, end)
        elif wire_type == _FIXED64:
            offset += 8
        elif wire_type == _LENGTH_DELIMITED:
            length, payload = _varint(data, offset, end)
            offset = payload + length
        elif wire_type == _FIXED32:
            offset += 4
        else:
            raise InvalidArgument(f"request: field {number} has unsupported wire type {wire_type}")
        if offset > end:
            raise InvalidArgument(f"request: field {number} runs past the end of its message")
        yield number, payload, offset


def _last(data: memoryview, start: int, end: int, number: int) -> tuple[int, int] | None:
    found = None
    for field, payload, stop in fields(data, start, end):
        if field == number:
            found = (payload, stop)  # a repeated singular field: the last one wins, as in protobuf
    return found


def _check_string_lists(data: memoryview, start: int, end: int, label: str, limits: Limits) -> None:
    """Refuse a `features` string list longer than the limit, counting at most limit + 1 strings;
    lists too short on the wire to exceed it are not looked into."""
    too_big = _MIN_STRING_BYTES * limits.max_bytes_elements
    if end - start <= too_big:
        return
    for number, entry_start, entry_end in fields(data, start, end):
        if number != _FEATURES or entry_end - entry_start <= too_big:
            continue
        key = _last(data, entry_start, entry_end, _MAP_KEY)
        value = _last(data, entry_start, entry_end, _MAP_VALUE)
        kind = value and _last(data, value[0], value[1], _STRING_LIST)
        if not kind:
            continue
        count = 0
        for item, _, _ in fields(data, kind[0], kind[1]):
            count += item == _LIST_ITEM
            if count > limits.max_bytes_elements:
                name = bytes(data[key[0] : key[1]]).decode(errors="replace") if key else ""
                limits.check_strings(f"{label}.features[{name!r}]", count, at_least=True)


def _parse(data: memoryview, start: int, end: int, label: str, limits: Limits) -> pb.PredictRequest:
    _check_string_lists(data, start, end, label, limits)
    try:
        return pb.PredictRequest.FromString(bytes(data[start:end]))
    except DecodeError as err:
        raise InvalidArgument(f"{label}: not a PredictRequest: {err}") from None


def parse_request(data: bytes, limits: Limits) -> pb.PredictRequest:
    """A serialized PredictRequest, its string lists checked before it is parsed."""
    return _parse(memoryview(data), 0, len(data), "request", limits)


def parse_batch(data: bytes, limits: Limits) -> list[pb.PredictRequest]:
    """The requests of a serialized PredictBatchRequest, counted against the limit before any is
    parsed; fields this version does not know are skipped, as protobuf does."""
    view = memoryview(data)
    spans = [(start, end) for number, start, end in fields(view) if number == _REQUESTS]
    limits.check_batch(len(spans))
    return [_parse(view, start, end, f"requests[{i}]", limits) for i, (start, end) in enumerate(spans)]
