"""The README's grpcurl examples, run exactly as written with the real grpcurl against a live server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from opd_grpc.process import ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str, str]]:
    """(commands, expected-output language, expected output) for each grpcurl block, in README order."""
    blocks = _BLOCK.findall(README.read_text())
    examples = []
    for i, (lang, body) in enumerate(blocks):
        if lang == "sh" and body.lstrip().startswith("grpcurl"):
            nxt_lang, nxt_body = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
            examples.append((body, nxt_lang if nxt_lang in ("json", "text") else "", nxt_body))
    return examples


def _matches(expected: Any, actual: Any) -> bool:
    """Equal, where "…" in the README stands for any value, and a list that ends in "…" for a list that starts
    with the items shown."""
    if expected == "…":
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and expected.keys() == actual.keys() and all(
            _matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list) and expected and expected[-1] == "…":
        shown = expected[:-1]
        return isinstance(actual, list) and len(actual) > len(shown) and all(map(_matches, shown, actual))
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(map(_matches, expected, actual))
    return expected == actual


def test_the_readme_has_an_example_of_every_call():
    text = "".join(body for body, _, _ in _examples())
    from opd_grpc._gen.opd.v1 import opd_pb2

    for method in opd_pb2.DESCRIPTOR.services_by_name["OPDTokenService"].methods:
        assert f"opd.v1.OPDTokenService/{method.name}" in text, method.name


def test_every_grpcurl_example_works_as_written(tmp_path: Path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        server = ServerProcess(tmp_path / "opd.db", test_clock=False, settings={"LISTEN": "127.0.0.1:50051"})
        server.start()
    except RuntimeError as error:
        pytest.fail(f"the README's examples need 127.0.0.1:50051 free (is `make run` running?): {error}")
    try:
        for commands, lang, expected in _examples():
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], env=env, capture_output=True,
                                 text=True, timeout=60)
            if lang == "text" and expected.startswith("ERROR:"):
                assert run.returncode != 0, commands
                # the Code: and Message: lines, and each detail (ErrorInfo with its metadata, BadRequest) as shown
                lines = [line.strip() for line in expected.splitlines()[1:] if line.strip() != "Details:"]
                assert len(lines) >= 3, expected
                for line in lines:
                    assert line in run.stderr, (commands, line, run.stderr)
            elif "-max-time" in commands:  # a stream that stays open, ended by grpcurl's own deadline
                assert "Code: DeadlineExceeded" in run.stderr and run.stdout.strip(), (commands, run.stderr)
            else:
                assert run.returncode == 0, (commands, run.stderr)
                if lang == "json":
                    assert _matches(json.loads(expected), json.loads(run.stdout)), (commands, run.stdout)
    finally:
        server.stop()
