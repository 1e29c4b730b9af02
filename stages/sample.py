"""DVC stage `sample` (one matrix entry): see `python -m pipeline sample --help`."""

import sys

from pipeline.cli import main

main(["sample", *sys.argv[1:]])
