from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import LiveServer, live_server


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    """A real server (SQLite file, test clock at 2030-01-07 07:00 UTC) on a free loopback port."""
    yield from live_server(tmp_path)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's `bash scripts/make_test_ca.sh certs` (a test CA, a server and a client certificate), run once
    in a folder of its own."""
    folder = tmp_path_factory.mktemp("tls")
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_test_ca.sh"
    subprocess.run(["bash", str(script), "certs"], cwd=folder, check=True, timeout=60)
    return folder / "certs"
