"""hybridize: turn a dense Llama-family Transformer into a Lightning + InfLLM-V2 sparse hybrid."""

__version__ = "0.1.0"
