"""The README's clinic-morning walk-through, sent again without grpcurl: each request goes through a client that
knows the service only from server reflection (as grpcurl does), and each answer must have the shape the README
shows — the same fields, nested the same way, with the same values wherever the README does not write "…".

A second witness beside tests/e2e/test_readme.py (which runs the real grpcurl): the README's requests and answers
are the service's, not one tool's."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from clients.library import OPDError
from opd_grpc.process import ServerProcess
from tests.e2e.test_readme import _BLOCK, README, _matches
from tests.support import fresh_database

WALKTHROUGH = "## A clinic morning with grpcurl"
_GRPCURL_CODES = {"".join(word.title() for word in code.name.split("_")): code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Request:
    method: str  # e.g. opd.v1.OPDTokenService/AllocateToken
    body: str  # the JSON of -d, "{}" without it
    stream_seconds: float | None  # -max-time, for a stream that grpcurl's deadline ends


@dataclass(frozen=True)
class Step:
    requests: list[Request]
    answer_lang: str  # "json", "text" or "" (no answer shown)
    answer: str


def _requests(block: str) -> list[Request]:
    """The grpcurl commands of a shell block, each parsed as the shell would split it."""
    requests, command = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        command += line + "\n"
        try:
            args = shlex.split(command)
        except ValueError:  # a quote still open: the -d JSON goes on over the next line
            continue
        command = ""
        if not args:
            continue
        assert args[0] == "grpcurl", command
        body, seconds, positional = "{}", None, []
        i = 1
        while i < len(args):
            if args[i] == "-d":
                body, i = args[i + 1], i + 2
            elif args[i] == "-max-time":
                seconds, i = float(args[i + 1]), i + 2
            elif args[i].startswith("-"):
                assert args[i] == "-plaintext", f"the walk-through uses plaintext without keys: {command}"
                i += 1
            else:
                positional.append(args[i])
                i += 1
        assert positional[0] == "127.0.0.1:50051", command
        requests.append(Request(positional[1] if len(positional) > 1 else "list", body, seconds))
    return requests


def walkthrough_steps() -> list[Step]:
    text = README.read_text()
    start = text.index(WALKTHROUGH)
    end = text.find("\n## ", start + 1)
    blocks = _BLOCK.findall(text[start: end if end > 0 else len(text)])
    steps = []
    for i, (lang, body) in enumerate(blocks):
        if lang == "sh" and body.lstrip().startswith("grpcurl"):
            nxt_lang, nxt_body = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
            answered = nxt_lang in ("json", "text")
            steps.append(Step(_requests(body), nxt_lang if answered else "", nxt_body if answered else ""))
    return steps


class ReflectionClient:
    """Calls any method by name, with message types learnt from the server's reflection service."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def services(self) -> list[str]:
        return ProtoReflectionDescriptorDatabase(self.channel).get_services()

    def _method(self, name: str) -> Any:
        service, method = name.rsplit("/", 1)
        return self.pool.FindServiceByName(service).FindMethodByName(method)

    def call(self, request: Request) -> list[dict[str, Any]]:
        """The answers as grpcurl prints them (proto3 JSON with the proto's field names); raises grpc.RpcError."""
        method = self._method(request.method)
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        message = json_format.Parse(request.body, request_type())
        path = f"/{request.method}"
        if method.server_streaming:
            call = self.channel.unary_stream(path, request_serializer=request_type.SerializeToString,
                                             response_deserializer=response_type.FromString)
            answers = []
            try:
                for answer in call(message, timeout=request.stream_seconds):
                    answers.append(_json(answer))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                    raise
            return answers
        call = self.channel.unary_unary(path, request_serializer=request_type.SerializeToString,
                                        response_deserializer=response_type.FromString)
        return [_json(call(message, timeout=10))]


def _json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _stream_kinds(text: str) -> list[str]:
    """The top-level field of each message grpcurl printed for a stream ("snapshot", "event", ...)."""
    return re.findall(r'^\{\n  "(\w+)"', text, re.M)


@pytest.fixture
def reflection_client(tmp_path: Path) -> Iterator[ReflectionClient]:
    """A fresh server as `make run` starts one, on this run's backend (SQLite, or a PostgreSQL schema)."""
    with fresh_database(tmp_path) as url, ServerProcess(url, test_clock=False) as server:
        with grpc.insecure_channel(server.address) as channel:
            yield ReflectionClient(channel)


@pytest.mark.backend_independent
def test_the_walkthrough_shows_an_answer_for_every_step():
    steps = walkthrough_steps()
    assert len(steps) >= 10
    unanswered = [s.requests[-1].method for s in steps if not s.answer_lang and s.requests[-1].method != "list"]
    assert not unanswered, f"steps of the walk-through without the answer a run gave: {unanswered}"


def test_the_walkthrough_gives_the_answers_it_shows_through_a_reflection_client(reflection_client):
    steps = walkthrough_steps()
    for step in steps:
        for request in step.requests[:-1]:
            reflection_client.call(request)
        last = step.requests[-1]
        if last.method == "list":
            assert "opd.v1.OPDTokenService" in reflection_client.services()
            continue
        if step.answer.startswith("ERROR:"):
            with pytest.raises(grpc.RpcError) as refused:
                reflection_client.call(last)
            error = OPDError.from_rpc_error(refused.value)
            shown = dict(line.strip().split(": ", 1) for line in step.answer.splitlines()[1:3])
            assert error.code == _GRPCURL_CODES[shown["Code"]], (last, error)
            assert error.message == shown["Message"], last
            assert f'"reason":"{error.reason}"' in step.answer, (last, error.reason)
            continue
        answers = reflection_client.call(last)
        if last.stream_seconds is not None:
            shown_kinds = _stream_kinds(step.answer)
            kinds = [next(iter(answer)) for answer in answers]
            assert kinds[:len(shown_kinds)] == shown_kinds, (last, kinds)
            continue
        (answer,) = answers
        if step.answer_lang == "json":
            assert _matches(json.loads(step.answer), answer), (last, json.dumps(answer, indent=2))
