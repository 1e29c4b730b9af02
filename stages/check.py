"""DVC stage `check`: see `python -m pipeline check --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/check.py."""

from pipeline.stages.check import main

main()
