"""The s3 destination: see destinations/s3/ (settings, send, actor and its service code)."""
