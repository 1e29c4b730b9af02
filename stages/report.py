"""DVC stage `report`: see `python -m pipeline report --help`."""

import sys

from pipeline.cli import main

main(["report", *sys.argv[1:]])
