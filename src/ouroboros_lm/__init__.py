"""ouroboros-lm: turn a pretrained decoder into a recursive transformer with an
input-conditioned, Controller-modulated recurrent block."""
from .adapter import load_adapter, save_adapter
from .config import OuroborosConfig
from . import hf_config
from .hf_config import OuroborosHFConfig
from .loading import load_base_model, load_tokenizer
from .model import OuroborosModel, OuroborosOutput
from .policy import RecursionPolicy
from .recurrence import StepTraining
from .train import TrainConfig, Trainer, train

__all__ = ["OuroborosConfig", "OuroborosForCausalLM", "OuroborosHFConfig", "OuroborosModel", "OuroborosOutput",
           "RecursionPolicy", "StepTraining", "TrainConfig", "Trainer", "load_adapter", "load_base_model", "load_tokenizer", "save_adapter", "train"]
__version__ = "0.1.0"


def register_hf_model() -> None:
    """Register OuroborosForCausalLM with AutoModelForCausalLM (imports transformers' modeling code)."""
    from .hf import register

    register()


# model_type "ouroboros" is known to AutoConfig at once; the model class (and transformers' modeling
# code, slow to import) joins AutoModelForCausalLM when the first OuroborosHFConfig is created.
hf_config.register_config()
hf_config.on_create[:] = [register_hf_model]


def __getattr__(name: str):
    if name in ("OuroborosForCausalLM", "OuroborosHFCache"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'ouroboros_lm' has no attribute {name!r}")
