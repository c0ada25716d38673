"""The sql destination: see destinations/sql/ (settings, send, actor and its service code)."""
