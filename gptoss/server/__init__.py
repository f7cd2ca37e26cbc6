"""An OpenAI-compatible HTTP server: a continuous-batching engine (engine.py) behind a FastAPI app (app.py),
with the request bodies (schemas.py), prompt building (prompts.py) and output adapters (outputs.py) apart."""

from gptoss.server.app import create_app
from gptoss.server.engine import Engine, EngineError, Generation
from gptoss.server.errors import APIError

__all__ = ["APIError", "Engine", "EngineError", "Generation", "create_app"]
