"""medkernels.models: HiFuse and MedMamba with the official architectures and state_dict keys."""
from .checkpoint import load_official_checkpoint
from .hifuse import HiFuse, hifuse_base, hifuse_small, hifuse_tiny
from .medmamba import MedMamba, medmamba_b, medmamba_s, medmamba_t

__all__ = [
    "HiFuse",
    "hifuse_tiny",
    "hifuse_small",
    "hifuse_base",
    "MedMamba",
    "medmamba_t",
    "medmamba_s",
    "medmamba_b",
    "load_official_checkpoint",
]
