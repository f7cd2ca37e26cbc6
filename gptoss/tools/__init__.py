"""gpt-oss's built-in tools, executed by the runtime: `browser` (search, open, find over a pluggable
backend) and `python` (a stateful, sandboxed interpreter)."""
