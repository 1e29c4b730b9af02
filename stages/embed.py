"""DVC stage `embed`: see `python -m pipeline embed --help`."""

import sys

from pipeline.cli import main

main(["embed", *sys.argv[1:]])
