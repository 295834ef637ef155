"""The end-of-day report: per doctor, utilisation, waits by source, bumps, no-shows, promotions and cancellations,
and a timeline of each slot through the day, as one self-contained HTML page.

`write_report` is the one entry point (the simulation and `opdctl report` call it); `figures` computes the report
from protobuf messages and `page` draws it, neither touching the network.
"""

from clients.report.fetch import fetch_report, write_report

__all__ = ["fetch_report", "write_report"]
