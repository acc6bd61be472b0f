"""The OpenAI-compatible frontend: HTTP in, token streams from an `EngineClient`, text out.

It never imports `tandem.engine`: any object with the `EngineClient` members can serve.
"""

from tandem.frontend.engine_client import EngineClient
from tandem.frontend.server import build_app

__all__ = ["EngineClient", "build_app"]
