"""DVC stage `images`: see `python -m pipeline images --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/images.py."""

from pipeline.stages.images import main

main()
