"""An OpenAI-compatible HTTP server: a continuous-batching engine (engine.py) behind a FastAPI app (openai_api.py)."""

from gptoss.server.engine import Engine, EngineError, Request
from gptoss.server.openai_api import APIError, create_app

__all__ = ["APIError", "Engine", "EngineError", "Request", "create_app"]
