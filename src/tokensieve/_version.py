"""The package version, in a module of its own so that any part of the house can read it without importing the
package front (``tokensieve/__init__.py``)."""

__version__ = "0.1.0"
