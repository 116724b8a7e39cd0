"""``python -m phi3data.cli``: the same as the ``phi3data`` command."""

from phi3data.cli import app

app(prog_name="phi3data")
