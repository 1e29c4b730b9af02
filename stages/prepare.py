"""DVC stage `prepare`: see `python -m pipeline prepare --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/prepare.py."""

from pipeline.stages.prepare import main

main()
