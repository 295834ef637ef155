"""`make lint` holds opd.v1 to protos/opd-v1-baseline.binpb with `buf breaking`: a stub a hospital system built
against opd.v1 must keep working. The check must refuse a change that breaks the wire (a field renumbered) and
let one that only adds (a new field) through."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.backend_independent

PROTOS = Path(__file__).parents[2] / "protos"
BASELINE = PROTOS / "opd-v1-baseline.binpb"
BUF = Path(sys.executable).parent / "buf"
SLOT_CAPACITY = "  int32 max_capacity = 6;\n  int32 consultation_minutes = 7;\n}"


def buf_breaking(tmp_path: Path, slot_fields: str) -> subprocess.CompletedProcess[str]:
    """`buf breaking` of a copy of the protos whose Slot ends with `slot_fields` instead of its own last two."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    proto = copy / "opd" / "v1" / "opd.proto"
    text = proto.read_text()
    assert text.count(SLOT_CAPACITY) == 1, "Slot's fields moved: update this test"
    proto.write_text(text.replace(SLOT_CAPACITY, slot_fields))
    return subprocess.run([str(BUF), "breaking", "--against", str(BASELINE)], cwd=copy, capture_output=True,
                          text=True, timeout=60)


def test_a_renumbered_field_breaks_opd_v1(tmp_path: Path):
    done = buf_breaking(tmp_path, "  int32 max_capacity = 16;\n  int32 consultation_minutes = 7;\n}")
    assert done.returncode != 0
    assert 'field "6" with name "max_capacity" on message "Slot" was deleted' in done.stdout, done.stdout


def test_a_new_field_does_not(tmp_path: Path):
    done = buf_breaking(tmp_path, SLOT_CAPACITY.removesuffix("}") + "  string room = 8;\n}")
    assert done.returncode == 0, done.stdout + done.stderr
