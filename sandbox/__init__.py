"""The child side of wfd: runs one workflow execution. Never imports wfd."""
