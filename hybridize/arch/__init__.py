"""The exported architecture. These files (not this __init__) are copied verbatim into every model folder."""

from .configuration_hybridize import LIGHTNING, SPARSE, HybridConfig, default_layer_types
from .modeling_hybridize import HybridCache, HybridForCausalLM, HybridModel

__all__ = ["HybridConfig", "HybridForCausalLM", "HybridModel", "HybridCache", "LIGHTNING", "SPARSE",
           "default_layer_types"]
