"""DVC stage `prepare`: see `python -m pipeline prepare --help`."""

import sys

from pipeline.cli import main

main(["prepare", *sys.argv[1:]])
