"""DVC stage `pretrained`: see `python -m pipeline pretrained --help`."""

import sys

from pipeline.cli import main

main(["pretrained", *sys.argv[1:]])
