"""UnGuide: concept erasure with a LoRA adapter (lora, targets, objective, io) and UnGuidance at sampling
time (stability test and guidance)."""
