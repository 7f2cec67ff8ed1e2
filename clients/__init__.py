"""Python client of the mofserve gRPC API (light: grpc, the generated stubs and numpy).

    from mofserve.clients import MofServeClient

    with MofServeClient("127.0.0.1:50051") as client:
        print(client.ask("photo.jpg", "Is the door open?", options="(a) Open (b) Closed").answer)
"""

from .client import (
    ALL_MODES,
    DEFAULT_TARGET,
    AsyncMofServeClient,
    MofServeClient,
    MofServeError,
    read_image,
)
from .results import (
    AskResult,
    EmbedResult,
    EncodeResult,
    Provenance,
    ServerInfo,
    TextEmbedResult,
    Timings,
    TokenDelta,
    Usage,
)

__all__ = [
    "ALL_MODES",
    "DEFAULT_TARGET",
    "AskResult",
    "AsyncMofServeClient",
    "EmbedResult",
    "EncodeResult",
    "MofServeClient",
    "MofServeError",
    "Provenance",
    "ServerInfo",
    "TextEmbedResult",
    "Timings",
    "TokenDelta",
    "Usage",
    "read_image",
]
