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
from tlkeras.serving import batching, server

FLAGS = flags.FLAGS
flags.DEFINE_string("model_base_path", None, "saved_models/NAME: holds numeric version folders.")
flags.DEFINE_string(
    "model_name", None, "Name in the URL: /v1/models/NAME (default: the folder name)."
)
PROCESS = tlkeras.cli.define_config_flags(server.ServerConfig)
SERVING = tlkeras.cli.define_config_flags(serving.ServingConfig)
flags.DEFINE_bool(
    "enable_batching",
    serving.ServingConfig().batching is not None,
    "Gather concurrent requests of one version into one model call.",
)
BATCHING = tlkeras.cli.define_config_flags(batching.BatchingConfig)
flags.mark_flag_as_required("model_base_path")
flags.adopt_module_key_flags(tlkeras.cli)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected no positional arguments, received {argv[1:]}")
    name = FLAGS.model_name or serving.model_name_from_base_path(FLAGS.model_base_path)
    config = serving.ServingConfig(
        batching=batching.BatchingConfig(**tlkeras.cli.config_values(BATCHING))
        if FLAGS.enable_batching
        else None,
        **tlkeras.cli.config_values(SERVING),
    )
    process = server.ServerConfig(**tlkeras.cli.config_values(PROCESS))
    server.freeze_startup_objects()
    running = server.make_server(FLAGS.model_base_path, name, config, process)
    server.serve(running, on_ready=lambda s: print(server.ready_message(s, name), flush=True))
    print("stopped", flush=True)


if __name__ == "__main__":
    tlkeras.cli.run(main)
