"""Serve exported SavedModels over TensorFlow Serving's REST API, locally, without Docker.

    python scripts/serve.py --model_base_path=saved_models/ants_bees --model_name=ants_bees --port=8501
    curl -X POST localhost:8501/v1/models/ants_bees:predict -d '{"instances": [{"b64": "..."}]}'

The highest version is served; a newly exported version is picked up without a restart.
"""

from absl import flags

import tlkeras.cli
from tlkeras import serving

FLAGS = flags.FLAGS
flags.DEFINE_string("model_base_path", None, "saved_models/NAME: holds numeric version folders.")
flags.DEFINE_string(
    "model_name", None, "Name in the URL: /v1/models/NAME (default: the folder name)."
)
flags.DEFINE_integer(
    "port", serving.DEFAULT_PORT, "REST port (TF Serving's is 8501).", lower_bound=0
)
flags.DEFINE_string(
    "host", serving.DEFAULT_HOST, "Interface to bind; 0.0.0.0 exposes it to the network."
)
flags.DEFINE_integer(
    "max_request_bytes", serving.MAX_REQUEST_BYTES, "Largest accepted request body.", lower_bound=1
)
flags.mark_flag_as_required("model_base_path")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected no positional arguments, received {argv[1:]}")
    name = FLAGS.model_name or serving.model_name_from_base_path(FLAGS.model_base_path)
    server = serving.make_server(
        FLAGS.model_base_path,
        name,
        host=FLAGS.host,
        port=FLAGS.port,
        max_request_bytes=FLAGS.max_request_bytes,
    )
    print(
        f"serving {name} from {FLAGS.model_base_path} at "
        f"http://{FLAGS.host}:{server.server_port}/v1/models/{name}",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    tlkeras.cli.run(main)
