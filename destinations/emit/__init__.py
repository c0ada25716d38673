"""The emit destination: see destinations/emit/ (settings, send, actor and its service code)."""
