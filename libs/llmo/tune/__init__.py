"""Fine-tuning: LoRA and QLoRA adapters (PEFT format) and logit distillation of smaller
students, for the Llama checkpoints the inference engine serves (``llmo tune --help``)."""

from llmo.tune.base import CheckpointError
from llmo.tune.checkpoints import ResumeError
from llmo.tune.data import DatasetError

__all__ = ["CheckpointError", "DatasetError", "ResumeError"]
