"""model-surgery: weight-level repair, attack and analysis of LLM safety alignment.

The library works directly on Hugging Face safetensors checkpoints and peft LoRA
adapters, one tensor at a time. See README.md for the architecture.
"""

from surgery.errors import SurgeryError

__version__ = "0.1.0"

__all__ = ["SurgeryError", "__version__"]
