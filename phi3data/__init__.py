"""phi3data: the Phi-3 data recipe as software."""

__version__ = "0.1.0"
