"""The LLaVA model: vision encoder -> projector -> language model, from megatron-core specs."""
