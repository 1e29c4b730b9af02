"""DVC stage `evaluate` (one matrix entry): see `python -m pipeline evaluate --help`."""

import sys

from pipeline.cli import main

main(["evaluate", *sys.argv[1:]])
