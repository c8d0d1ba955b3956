"""The one exception type for bad input: its message is a single line naming the problem and the fix.

Scripts print it to stderr and exit non-zero, without a traceback (run_script).
"""
import sys
import warnings


class NanocustomError(ValueError):
    pass


def run_script(main):
    """A script's entry point: bad input is one `error:` line on stderr and exit code 2; a warning is one `warning:`
    line (not Python's two, with the source line); Ctrl-C exits with 130."""
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        main()
    except NanocustomError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def check_device(name):
    """A --device torch cannot parse, or a CUDA device on a machine without one, as one line before any work."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NanocustomError(f"--device {name!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanocustomError(f"--device {name}: this machine has no CUDA GPU torch can use; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NanocustomError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices; use cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
