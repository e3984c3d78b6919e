"""The package version (here, so that the ground floor can record it)."""

__version__ = "0.1.0"
