"""Python client for the snac-dit server: httpx + numpy only (never torch)."""

from clients.client import AsyncClient, Chunk, Client, Result, join_chunks
from clients.errors import (
    ApiError,
    BadRequest,
    ConnectionFailed,
    InvalidParameter,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    SnacDitError,
    StreamError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from clients.wav import decode_wav, encode_wav

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "Result",
    "join_chunks",
    "decode_wav",
    "encode_wav",
    "ApiError",
    "BadRequest",
    "ConnectionFailed",
    "InvalidParameter",
    "Overloaded",
    "PayloadTooLarge",
    "ServerError",
    "SnacDitError",
    "StreamError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
]
