"""Framework glue: Megatron-Core (``megatron``), MindSpeed, MindSpore."""
