"""Examples of the package in use, run from the repository root (not installed)."""
