"""``node-agent`` command line: ``run``, ``launch``, ``wizard``."""

from __future__ import annotations

import sys

USAGE = """usage: node-agent {run,launch,wizard} ...

  run -- CMD ...      inside the job/container: connect to the broker and supervise CMD
                      (jupyterhub-singleuser); settings come from the job environment
  launch -- CMD ...   in the batch job, outside the container: prepare home/overlay and
                      exec the container with `node-agent run` inside
  wizard              write the HPC-side configuration interactively
  --version           print the version
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from wire.version import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from .agent import run  # imported before --help too: `run --help` proves the agent imports

        if rest[:1] in (["-h"], ["--help"]):
            from . import settings

            print(f"usage: node-agent run [--] CMD ...\n\n{settings.__doc__}")
            return 0
        if rest and rest[0] == "--":
            rest = rest[1:]
        return run(rest)
    if cmd == "launch":
        from .launch import main as launch_main

        return launch_main(rest)
    if cmd == "wizard":
        from .wizard import main as wizard_main

        return wizard_main(rest)
    print(f"node-agent: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
