"""opdctl: the command-line client of the OPD token service for clinic staff (`opdctl --help`).

Modules, one concern each: `parser` (flags and help), `commands` (the calls each subcommand makes), `pattern`
(the slot pattern language), `render` (tables, lines and JSON), `errors` (messages, hints and exit codes), and
`__main__` (which ties them together).
"""
