"""DVC stage `sample`: see `python -m pipeline sample --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/sample.py."""

from pipeline.stages.sample import main

main()
