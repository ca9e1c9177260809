"""Online stage: the FastAPI ranking service."""
