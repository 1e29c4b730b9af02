"""The DVC stages, one module each. A stage imports the library, `pipeline.config`,
`pipeline.artifacts` and `pipeline.stages.common`, never another stage."""
