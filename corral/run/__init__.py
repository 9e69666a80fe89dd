"""The `generate`, `chat`, `prompt` and `models` commands (terminal front ends)."""
