"""agd: active generative design of inorganic materials."""

__version__ = "0.1.0"
