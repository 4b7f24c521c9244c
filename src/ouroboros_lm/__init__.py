"""ouroboros-lm: turn a pretrained decoder into a recursive transformer with an
input-conditioned, Controller-modulated recurrent block."""
from .adapter import load_adapter, save_adapter
from .config import OuroborosConfig
from .hf import OuroborosForCausalLM, OuroborosHFConfig  # registers model_type "ouroboros" with the Auto classes
from .loading import load_base_model, load_tokenizer
from .model import OuroborosModel, OuroborosOutput
from .train import TrainConfig, Trainer, train

__all__ = ["OuroborosConfig", "OuroborosForCausalLM", "OuroborosHFConfig", "OuroborosModel", "OuroborosOutput",
           "TrainConfig", "Trainer", "load_adapter", "load_base_model", "load_tokenizer", "save_adapter", "train"]
__version__ = "0.1.0"
