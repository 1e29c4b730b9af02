"""DVC stage `evaluate`: see `python -m pipeline evaluate --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/evaluate.py."""

from pipeline.stages.evaluate import main

main()
