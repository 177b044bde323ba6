"""CLI sub-commands (thin: parse arguments, call library code)."""
