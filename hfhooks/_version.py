"""Single source of the package version (read by pyproject and stamped into saved artifacts)."""

__version__ = "0.1.0"
