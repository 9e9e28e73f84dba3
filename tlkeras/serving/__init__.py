"""serving: the TF-Serving REST app, servables and versions, batching, the server

Sits on ``exports`` (it serves what they write and loads it as they do).

- ``app``: the REST API; ``request``: one request's limits and body; ``metrics``: Prometheus.
- ``servables``: versions, their policy and background loading; ``batching``: request batching.
- ``server``: the process (Waitress, graceful shutdown).
"""

# The names of the flat ``tlkeras.serving`` module before the subpackages, from their homes.
from tlkeras.analysis.calibration import check_min_score, withhold_low_scores
from tlkeras.data import declared_dimensions
from tlkeras.data.decoding import MAX_IMAGE_PIXELS
from tlkeras.exports.loading import tf_error_message
from tlkeras.exports.signatures import BYTES_SIGNATURE
from tlkeras.serving.app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    METRICS_PATH,
    ServingConfig,
    create_app,
    model_name_from_base_path,
    predict,
    signature_metadata,
    version_status,
)
from tlkeras.serving.batching import BatchingConfig, QueueFullError
from tlkeras.serving.metrics import Metrics
from tlkeras.serving.request import (
    MAX_INSTANCES,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_PIXELS,
    REQUEST_TIMEOUT,
    RequestError,
    parse_body,
    too_large_message,
)
from tlkeras.serving.servables import (
    DEFAULT_POLL_SECONDS,
    ModelManager,
    Servable,
    VersionPolicy,
    VersionState,
)

__all__ = [
    "BYTES_SIGNATURE",
    "BatchingConfig",
    "DEFAULT_HOST",
    "DEFAULT_POLL_SECONDS",
    "DEFAULT_PORT",
    "MAX_IMAGE_PIXELS",
    "MAX_INSTANCES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_PIXELS",
    "METRICS_PATH",
    "Metrics",
    "ModelManager",
    "QueueFullError",
    "REQUEST_TIMEOUT",
    "RequestError",
    "Servable",
    "ServingConfig",
    "VersionPolicy",
    "VersionState",
    "check_min_score",
    "create_app",
    "declared_dimensions",
    "model_name_from_base_path",
    "parse_body",
    "predict",
    "signature_metadata",
    "tf_error_message",
    "too_large_message",
    "version_status",
    "withhold_low_scores",
]
