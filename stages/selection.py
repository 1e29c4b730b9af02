"""DVC stage `selection`: see `python -m pipeline selection --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/selection.py."""

from pipeline.stages.selection import main

main()
