"""Model definitions. One decoder implementation serves the whole Llama family."""

from tandem.engine.models.llama import SUPPORTED_MODEL_TYPES, LlamaForCausalLM

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaForCausalLM"]
