"""The data plane: an OpenAI-compatible gateway (Litestar) in front of the engines.

It authenticates and rate-limits, maps a public model alias to the version it serves,
relays (streamed) completions, guards them, and commits every turn to the store before
acknowledging it. It keeps no state of its own beyond caches, so any number of replicas
can share one PostgreSQL store. Other packages use what this module exports.
"""

from __future__ import annotations

from gateway.app import AppExtension, create_app, server_options
from gateway.auth import Principal, create_key, hash_key
from gateway.cli import LOG_LEVEL_OPTION, register_gateway_commands
from gateway.engine_pool import EnginePool
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    UnprocessableRequestError,
    UpstreamError,
    UpstreamUnavailableError,
)
from gateway.logs import LogLevel, configure_logging, log_config
from gateway.protocol import ADAPTER_VERSION_NAME, ALIAS_NAME, engine_error_message
from gateway.routes import BEARER, provide_admin, provide_resources, strict_body
from gateway.settings import (
    ADMIN_KEY_ENV,
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    UPSTREAM_URL_ENV,
    GatewaySettings,
    load_settings,
    resolve_data_dir,
)

__all__ = [
    "ADAPTER_VERSION_NAME",
    "ADMIN_KEY_ENV",
    "ALIAS_NAME",
    "BEARER",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "LOG_LEVEL_OPTION",
    "UPSTREAM_URL_ENV",
    "AppExtension",
    "EnginePool",
    "GatewayError",
    "GatewaySettings",
    "InvalidRequestError",
    "LogLevel",
    "NotFoundError",
    "Principal",
    "UnprocessableRequestError",
    "UpstreamError",
    "UpstreamUnavailableError",
    "configure_logging",
    "create_app",
    "create_key",
    "engine_error_message",
    "hash_key",
    "load_settings",
    "log_config",
    "provide_admin",
    "provide_resources",
    "register_gateway_commands",
    "resolve_data_dir",
    "server_options",
    "strict_body",
]
