"""DVC stage `vision`: see `python -m pipeline vision --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/vision.py."""

from pipeline.stages.vision import main

main()
