"""Serve exported SavedModels over TensorFlow Serving's REST API, locally, without Docker.

    python scripts/serve.py --model_base_path=saved_models/ants_bees --port=8501
    curl -X POST localhost:8501/v1/models/ants_bees:predict -d '{"instances": [{"b64": "..."}]}'
    curl localhost:8501/monitoring/prometheus/metrics

New versions are loaded and warmed up in the background and swapped in without a stall; concurrent
requests are batched; SIGTERM finishes the requests in flight before exiting. Flag names follow
TF Serving's model server where it has one. ``--min_score`` (or a request's ``"min_score"``) answers
"unknown" for images whose top score is below it (``tlkeras.serving.app``).
"""

from absl import flags

import tlkeras.cli
from tlkeras.serving import app as serving
from tlkeras.serving import batching, servables, server

_B = batching.BatchingConfig()
_S = serving.ServingConfig()
_P = server.ServerConfig()

FLAGS = flags.FLAGS
flags.DEFINE_string("model_base_path", None, "saved_models/NAME: holds numeric version folders.")
flags.DEFINE_string(
    "model_name", None, "Name in the URL: /v1/models/NAME (default: the folder name)."
)
flags.DEFINE_integer("port", _P.port, "REST port (TF Serving's is 8501).", lower_bound=0)
flags.DEFINE_string("host", _P.host, "Interface to bind; 0.0.0.0 exposes it to the network.")
flags.DEFINE_string(
    "model_version_policy",
    _S.model_version_policy,
    "Versions to serve: latest, latest:N, all, or specific:V1,V2.",
)
flags.DEFINE_float(
    "file_system_poll_wait_seconds",
    servables.DEFAULT_POLL_SECONDS,
    "How often to look for new or removed versions.",
)
flags.DEFINE_bool(
    "enable_batching",
    _S.batching is not None,
    "Gather concurrent requests of one version into one model call.",
)
flags.DEFINE_integer("max_batch_size", _B.max_batch_size, "Most rows in one model call.")
flags.DEFINE_integer(
    "batch_timeout_micros",
    _B.batch_timeout_micros,
    "Longest wait for more requests once one is queued.",
)
flags.DEFINE_integer("num_batch_threads", _B.num_batch_threads, "Model calls run in parallel.")
flags.DEFINE_integer(
    "max_enqueued_batches", _B.max_enqueued_batches, "Queue bound, in batches; beyond it: 503."
)
flags.DEFINE_integer("max_request_bytes", _S.max_request_bytes, "Largest accepted request body.")
flags.DEFINE_integer("max_instances", _S.max_instances, "Most instances in one request.")
flags.DEFINE_integer(
    "max_request_pixels", _S.max_request_pixels, "Most decoded pixels of all images of a request."
)
flags.DEFINE_float(
    "request_timeout", _S.request_timeout, "Seconds a prediction may wait for the model: then 503."
)
flags.DEFINE_float(
    "min_score",
    _S.min_score,
    'Rows whose top score is below it answer classes "unknown" (scores kept); a request\'s own '
    '"min_score" overrides it. 0: off.',
)
flags.DEFINE_integer("threads", _P.threads, "Request threads (bounded pool).")
flags.DEFINE_integer("connection_limit", _P.connection_limit, "Most open connections.")
flags.DEFINE_integer(
    "idle_timeout", _P.idle_timeout, "Seconds before an idle or stalled connection is closed."
)
flags.DEFINE_float(
    "shutdown_timeout",
    _P.shutdown_timeout,
    "On SIGTERM, seconds in-flight requests get to finish.",
)
flags.mark_flag_as_required("model_base_path")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected no positional arguments, received {argv[1:]}")
    name = FLAGS.model_name or serving.model_name_from_base_path(FLAGS.model_base_path)
    config = serving.ServingConfig(
        model_version_policy=FLAGS.model_version_policy,
        poll_seconds=FLAGS.file_system_poll_wait_seconds,
        batching=batching.BatchingConfig(
            max_batch_size=FLAGS.max_batch_size,
            batch_timeout_micros=FLAGS.batch_timeout_micros,
            num_batch_threads=FLAGS.num_batch_threads,
            max_enqueued_batches=FLAGS.max_enqueued_batches,
        )
        if FLAGS.enable_batching
        else None,
        max_request_bytes=FLAGS.max_request_bytes,
        max_instances=FLAGS.max_instances,
        max_request_pixels=FLAGS.max_request_pixels,
        request_timeout=FLAGS.request_timeout,
        min_score=FLAGS.min_score,
    )
    process = server.ServerConfig(
        host=FLAGS.host,
        port=FLAGS.port,
        threads=FLAGS.threads,
        connection_limit=FLAGS.connection_limit,
        idle_timeout=FLAGS.idle_timeout,
        shutdown_timeout=FLAGS.shutdown_timeout,
    )
    server.freeze_startup_objects()
    running = server.make_server(FLAGS.model_base_path, name, config, process)
    server.serve(running, on_ready=lambda s: print(server.ready_message(s, name), flush=True))
    print("stopped", flush=True)


if __name__ == "__main__":
    tlkeras.cli.run(main)
