"""The exported architecture. These files (not this __init__) are copied verbatim into every model folder."""

from .configuration_hybridize import LIGHTNING, SPARSE, HybridConfig, default_layer_types
from .modeling_hybridize import HybridCache, HybridForCausalLM, HybridModel

__all__ = ["HybridConfig", "HybridForCausalLM", "HybridModel", "HybridCache", "LIGHTNING", "SPARSE",
           "default_layer_types", "register_auto_classes"]


def register_auto_classes() -> None:
    """Let the Auto classes build hybrids from these installed classes. Without this, a hybrid folder loads only
    with trust_remote_code, which imports the folder's own copy of the modeling files: code from wherever the folder
    came from."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
    AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
    AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
