"""ouroboros-lm: turn a pretrained decoder into a recursive transformer with an
input-conditioned, Controller-modulated recurrent block."""
from .config import OuroborosConfig
from .loading import load_base_model, load_tokenizer
from .model import OuroborosModel, OuroborosOutput

__all__ = ["OuroborosConfig", "OuroborosModel", "OuroborosOutput", "load_base_model", "load_tokenizer"]
__version__ = "0.1.0"
