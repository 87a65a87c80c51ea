"""Stable Diffusion v1.x in the CompVis layout, with LoRA-guided concept erasure (UnGuide) in ldm.erasure."""
