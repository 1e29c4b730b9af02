"""DVC stage `finetune`: see `python -m pipeline finetune --help`. Imports only its own stage module,
so dvc.yaml's deps for this stage are the import closure of pipeline/stages/finetune.py."""

from pipeline.stages.finetune import main

main()
