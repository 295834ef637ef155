from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support import LiveServer, live_server


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    """A real server (SQLite file, test clock at 2030-01-07 07:00 UTC) on a free loopback port."""
    yield from live_server(tmp_path)
