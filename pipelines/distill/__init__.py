"""The distill stage: a trained model turned into a few-step student (progressive distillation)."""
