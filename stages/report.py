"""DVC stage `report`: see `python -m pipeline report --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/report.py."""

from pipeline.stages.report import main

main()
