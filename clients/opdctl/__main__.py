"""The `opdctl` console script: parses the flags, connects, runs the subcommand, and turns every refusal or
unreachable server into a message on stderr and an exit code, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from clients.library import OPDClient, OPDError, tls_credentials
from clients.opdctl import commands, parser
from clients.opdctl.errors import EXIT_USAGE, Refused, UsageError, command_name, exit_code, explain
from clients.opdctl.pattern import PatternError
from clients.opdctl.render import Printer


def main(argv: list[str] | None = None) -> int:
    args = parser.build().parse_args(argv)  # a bad flag: argparse prints the usage and exits with 2
    command = command_name(args)
    try:
        credentials = (tls_credentials(*(Path(f) if f else None for f in (args.ca_cert, args.cert, args.key_file)))
                       if args.ca_cert or args.cert or args.key_file else None)
    except (OSError, ValueError) as error:
        print(f"{command}: cannot use the TLS files: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with OPDClient(args.address, timeout=args.timeout, api_key=args.key or None,
                       credentials=credentials) as client:
            commands.fill_in_today(client, args)
            args.run(client, args, Printer(args.json))
    except Refused as refused:
        print(explain(refused.error, args, refused.notes), file=sys.stderr)
        return exit_code(refused.error)
    except OPDError as error:
        print(explain(error, args), file=sys.stderr)
        return exit_code(error)
    except (UsageError, PatternError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`opdctl tokens list ... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
