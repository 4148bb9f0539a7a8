"""loramux's OpenAI-compatible HTTP server: routes -> protocol types -> engine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loramux")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
