"""The OpenAI-compatible gateway (Litestar)."""
