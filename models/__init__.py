"""dsv4.models: ModelArgs, the eager DeepseekV4 reference model, its kernels, state and checkpoint format."""

from .config import ConfigError, ModelArgs, preset
from .model import DeepseekV4
from .state import init_state, state_entries
from .synthetic import init_random_

__all__ = ["ConfigError", "DeepseekV4", "ModelArgs", "init_random_", "init_state", "preset", "state_entries"]
