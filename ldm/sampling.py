"""Text to image: prompts and seeds -> latents -> pictures, with classifier-free guidance."""
import torch

from ldm.images import start_noise, to_pil
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, sample_ddim


@torch.no_grad()
def txt2img(model, prompts: list[str], seeds: list[int], image_size: int = 512, steps: int = 50,
            scale: float = 7.5, eta: float = 0.0, release_schedule: bool = False, verbose: bool = False):
    """One image per (prompt, seed), CFG with the empty prompt as the unconditional branch -> list of PIL images."""
    cond = model.get_learned_conditioning(list(prompts))
    uncond = model.get_learned_conditioning([""] * len(prompts))
    x_T = start_noise(seeds, model.latent_shape(image_size), model.device, model.dtype)
    fn = cfg_model_fn(model.apply_model, cond, uncond, scale)
    timesteps = ddim_timesteps(steps, model.num_timesteps, release_schedule)
    z = sample_ddim(fn, x_T, model.alphas_cumprod, timesteps, eta=eta,
                    generator=torch.Generator(model.device).manual_seed(int(seeds[0])), verbose=verbose)
    return to_pil(model.decode_first_stage(z))
