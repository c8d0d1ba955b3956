"""The one exception type for bad input: its message is a single line naming the problem and the fix.

Scripts print it to stderr and exit non-zero, without a traceback.
"""


class NanocustomError(ValueError):
    pass
