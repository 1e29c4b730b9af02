"""DVC stage `embed`: see `python -m pipeline embed --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/embed.py."""

from pipeline.stages.embed import main

main()
