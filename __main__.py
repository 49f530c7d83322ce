"""Entry point of the packaged application (MAP): ``python3 /opt/holoscan/app`` runs the batch
contract on HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH; any arguments are
passed to ``python -m app`` (e.g. ``serve``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["run"]))
