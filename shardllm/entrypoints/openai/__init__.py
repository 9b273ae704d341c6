"""The OpenAI-compatible HTTP server (FastAPI + uvicorn); these imports stay out of the engine core."""
