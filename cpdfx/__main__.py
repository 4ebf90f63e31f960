"""`python -m cpdfx ...` runs the CLI as the `cpdfx` script does; torchrun needs
a module or a file to start: `torchrun --nproc_per_node 2 -m cpdfx compress ...`."""
import sys

from .cli import main

sys.exit(main())
