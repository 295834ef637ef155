"""Storage with SQLAlchemy 2.x: SQLite embedded, PostgreSQL for several replicas."""
