"""Offline training of the embedded digits model (not part of the package or the test run)."""
