"""The MAP's build context as holoscan-cli 4.2.0's packager generates it, without building it.

``python -m container.map_layout DEST -- <monai-deploy package arguments>`` runs the real
packager (``holoscan_cli.__main__.main``: manifest download or ``--source``, app.json,
pkg.json, application, models, ``tools`` and the generated Dockerfile) in this process, with
one step replaced: instead of ``docker buildx build`` (which needs buildx, Docker Hub for the
BuildKit image, nvcr.io for the CUDA base and the NVIDIA and Ubuntu archives), its build
context is copied to DEST and the tag it would have built is written to ``DEST/TAG``.
The image test (``make test-image``) builds that layout on the CPU node image and runs it with
plain ``docker run`` over the MAP contract. Research software, not a medical device.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[0]).resolve()
    package_args = argv[2:]

    from holoscan_cli.__main__ import main as holoscan_main
    from holoscan_cli.packager import container_builder
    from holoscan_cli.packager.parameters import PlatformBuildResults

    def keep_build_context(self, dockerfile: str, platform_parameters) -> PlatformBuildResults:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(self._temp_dir, dest)
        (dest / "TAG").write_text(platform_parameters.tag + "\n")
        (dest / "BASE_IMAGE").write_text(f"{platform_parameters.base_image}\n")
        result = PlatformBuildResults(platform_parameters)
        result.succeeded = True
        result.docker_tag = platform_parameters.tag
        print(f"map_layout: build context of {platform_parameters.tag} (Dockerfile {Path(dockerfile).name}) "
              f"kept in {dest}; not built")
        return result

    container_builder.BuilderBase._build_internal = keep_build_context
    sys.argv = ["monai-deploy", "package", *package_args]
    code = holoscan_main()
    return int(code or 0) if (dest / "TAG").is_file() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
