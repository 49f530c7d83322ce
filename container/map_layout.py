"""The MAP's build context as holoscan-cli 4.2.0's packager generates it, without building it.

``python -m container.map_layout DEST -- <monai-deploy package arguments>`` runs the real
packager (``holoscan_cli.__main__.main``: manifest download or ``--source``, app.json,
pkg.json, application, models, ``tools`` and the generated Dockerfile) in this process, with
one step replaced: instead of ``docker buildx build`` (which needs buildx, Docker Hub for the
BuildKit image, nvcr.io for the CUDA base and the NVIDIA and Ubuntu archives), its build
context is copied to DEST and the tag it would have built is written to ``DEST/TAG``.
``python -m container.map_layout --cpu-dockerfile DEST`` then writes ``DEST/Dockerfile.cpu``:
the generated Dockerfile with only the steps that need NVIDIA's or Ubuntu's servers taken out
(:data:`DROPPED`), for a layout generated with ``--source`` naming the CPU node image as the
base. The image test (``make test-image``) builds it and runs it with plain ``docker run``
over the MAP contract. Research software, not a medical device.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


#: Instructions of the generated Dockerfile that the CPU emulation leaves out, and why: each
#: needs a server or a base image this emulation does not have; the node image already holds
#: the Python 3.11 environment with every runtime pin (requirements-runtime.txt).
DROPPED = {
    "cuda-keyring": "NVIDIA's apt key from developer.download.nvidia.com (CUDA base only)",
    "python3-minimal=": "Ubuntu 24.04's Python 3.12 packages (the node image has Python 3.11 in /opt/venv)",
    "pip install": "the requirements (already installed in the node image's /opt/venv)",
}


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments and blanks dropped."""
    out, current = [], ""
    for line in dockerfile.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + (" " if line.rstrip().endswith("\\") else "")
        if not line.rstrip().endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def cpu_dockerfile(generated: str) -> str:
    """The generated Dockerfile for a CPU run on the node image (see :data:`DROPPED`)."""
    lines = ["# Generated from holoscan-cli 4.2.0's Dockerfile by container/map_layout.py (CPU emulation)."]
    for ins in instructions(generated):
        reason = next((why for key, why in DROPPED.items() if ins.startswith("RUN") and key in ins), None)
        if reason:
            lines.append(f"# left out ({reason}): {ins[:100]}...")
            continue
        if ins.startswith("RUN useradd"):
            ins = ins.replace(" -G sudo", "")  # Debian's minimal base has no sudo group
        lines.append(ins)
        if ins.startswith("FROM ") and " AS base" in ins:
            # Root for the packager's steps; and only the MAP's copy of the application may run.
            lines += ["USER root", "ENV PYTHONPATH=", "RUN rm -rf /opt/paraspinal"]
    # The node image's HEALTHCHECK (python -m app status --health) is for `serve`, not a batch MAP.
    lines.insert(next(i for i, x in enumerate(lines) if x.startswith("ENTRYPOINT")), "HEALTHCHECK NONE")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--cpu-dockerfile":
        layout = Path(argv[1])
        (layout / "Dockerfile.cpu").write_text(cpu_dockerfile((layout / "Dockerfile").read_text()))
        print(f"map_layout: wrote {layout / 'Dockerfile.cpu'}")
        return 0
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
