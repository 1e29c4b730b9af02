"""The DVC stages, one module each. A stage imports the library, `pipeline.config`,
`pipeline.artifacts` and `pipeline.stages.common`, never another stage.

A stage runs as a short process of its own (a DVC entry): its garbage collection is set for
that before the stage's heavy imports run (`pipeline.core.env.short_process_gc`)."""

from pipeline.core import env as _env

_env.short_process_gc()
