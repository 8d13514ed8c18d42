"""`visto serve`: an OpenAI-compatible HTTP API (chat with images, embeddings, search) and a
web page, over the engine, the two-tower model and the vector store. See app.py."""

from visto.serve.app import ChatModel, ServedModels, ServeSettings, create_app
from visto.serve.content import ImagePolicy

__all__ = ["ChatModel", "ImagePolicy", "ServeSettings", "ServedModels", "create_app"]
