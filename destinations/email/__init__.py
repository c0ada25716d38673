"""The email destination: see destinations/email/ (settings, send, actor and its service code)."""
