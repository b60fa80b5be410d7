"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class UserError(ValueError):
    """A mistake in the user's input or config. `train.py` prints it as one line and exits 2."""


class SkipRun(Exception):
    """A configuration that cannot run by design (e.g. an adapter whose output position comes
    before its input): results.json says "skipped" with the reason, and a sweep goes on."""
