"""Tools for development, tests and the local stack (not used on the serving path)."""
