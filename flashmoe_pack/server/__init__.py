"""The OpenAI-compatible HTTP server behind `flashmoe-pack serve` (FastAPI + uvicorn)."""

from .app import create_app

__all__ = ["create_app"]
