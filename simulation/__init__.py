"""A client that plays an OPD day against a running opd-grpc server and checks SPEC §3 through the API.

`python -m simulation --seed 7` (small) or `--large`; see `simulation.__main__` for the options.
"""
