"""The sse destination: see destinations/sse/ (settings, send, actor and its service code)."""
