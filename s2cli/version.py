"""The version of s2cli (one place; the package, the CLI and every output file read it here)."""
__version__ = "0.1.0"
