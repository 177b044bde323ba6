"""mm_megatron."""
