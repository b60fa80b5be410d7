"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class UserError(ValueError):
    """A mistake in the user's input or config. `train.py` prints it as one line and exits 2."""
