"""`python -m depthwave.cli`, the same as the `depthwave` command."""

from depthwave.cli import main

main()
