"""Which coordinates: ``ParamMask`` (``mask``), exact global top-k (``topk``), saliency scores (``saliency``) and
masks on LoRA adapters (``lora``)."""
