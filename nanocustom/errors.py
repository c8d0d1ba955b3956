"""The one exception type for bad input: its message is a single line naming the problem and the fix.

Scripts print it to stderr and exit non-zero, without a traceback (run_script).
"""
import sys


class NanocustomError(ValueError):
    pass


def run_script(main):
    """A script's entry point: bad input is one `error:` line on stderr and exit code 2; Ctrl-C exits with 130."""
    try:
        main()
    except NanocustomError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
