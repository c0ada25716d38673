"""The http destination: see destinations/http/ (settings, send, actor and its service code)."""
