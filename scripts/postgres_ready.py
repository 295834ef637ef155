"""`python scripts/postgres_ready.py URL`: exit 0 if the PostgreSQL at URL answers, else print why and exit 1.

`make test` runs the suite's PostgreSQL half only when this says yes (CI requires it)."""

from __future__ import annotations

import sys

import sqlalchemy


def main(url: str) -> int:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sqlalchemy.exc.OperationalError as error:
        print(f"cannot reach PostgreSQL at {url}: {str(error.orig).strip().splitlines()[0]}")
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
