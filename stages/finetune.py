"""DVC stage `finetune` (one matrix entry): see `python -m pipeline finetune --help`."""

import sys

from pipeline.cli import main

main(["finetune", *sys.argv[1:]])
