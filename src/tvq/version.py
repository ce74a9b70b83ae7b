"""The package version, on its own so that modules can name it without importing tvq itself."""

__version__ = "0.1.0"
