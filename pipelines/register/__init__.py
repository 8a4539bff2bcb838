"""The register stage: a new MLflow Model Registry version of the trained model, promoted to an alias only if its
evaluation metric beats the alias's current version.

config.py     RegisterConfig, PromoteIf
registry.py   register_model and the comparison against the champion (MLflow only)
stage.py      KIND: the stage the pipeline runner calls
"""
