"""DVC stage `pretrained`: see `python -m pipeline pretrained --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/pretrained.py."""

from pipeline.stages.pretrained import main

main()
