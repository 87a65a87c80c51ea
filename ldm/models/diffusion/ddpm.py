"""LatentDiffusion: UNet + VAE + text encoder, eps-parameterisation, linear beta schedule.

Notation (DDPM, Ho et al. 2020), with code names:
    beta_t                 betas[t]                t = 0 .. T-1, T = 1000
    alpha_bar_t            alphas_cumprod[t]       prod_{s<=t} (1 - beta_s)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (q_sample)
    eps_theta(x_t, t, c)   apply_model(x_t, t, c)  c: text context [B, 77, 768]

Latents are the VAE's z times scale_factor (0.18215 for SD v1).
"""
import math

import torch
import torch.nn as nn

from ldm.config import instantiate_from_config
from ldm.errors import UserError

SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

# Options of the CompVis config that only matter for training the base model; accepted and ignored.
_TRAINING_ONLY = {"num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "cond_stage_trainable",
                  "monitor", "use_ema", "scheduler_config", "cond_stage_forward", "loss_type", "ckpt_path",
                  "ignore_keys", "load_only_unet", "learn_logvar", "logvar_init", "original_elbo_weight",
                  "l_simple_weight", "v_posterior", "clip_denoised", "use_positional_encodings", "make_it_fit",
                  "ucg_training", "reset_ema", "reset_num_ema_updates", "concat_mode", "given_betas",
                  "cosine_s", "image_size", "channels"}


def make_schedule(linear_start: float, linear_end: float, num_timesteps: int) -> dict[str, torch.Tensor]:
    """The 12 schedule tensors of the CompVis checkpoint ([T] each, float32, computed in float64)."""
    f64 = {"dtype": torch.float64, "device": "cpu"}  # explicit device: also right when built under torch.device("meta")
    betas = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, **f64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, **f64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    s = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - ac), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in s.items()}


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `.diffusion_model` (checkpoint keys `model.diffusion_model.*`)."""

    def __init__(self, unet_config: dict):
        super().__init__()
        self.diffusion_model = instantiate_from_config(unet_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context)


class LatentDiffusion(nn.Module):
    def __init__(self, unet_config: dict, first_stage_config: dict, cond_stage_config: dict,
                 linear_start: float = 1e-4, linear_end: float = 2e-2, timesteps: int = 1000,
                 beta_schedule: str = "linear", parameterization: str = "eps", scale_factor: float = 1.0,
                 scale_by_std: bool = False, conditioning_key: str = "crossattn", **options):
        super().__init__()
        unknown = set(options) - _TRAINING_ONLY
        if unknown:
            raise ValueError(f"LatentDiffusion: unknown options {sorted(unknown)}")
        if beta_schedule != "linear" or parameterization != "eps" or conditioning_key != "crossattn":
            raise ValueError("LatentDiffusion: only the linear schedule, eps-parameterisation and cross-attention "
                             "conditioning of SD v1 are implemented")
        self.image_size = options.get("image_size")  # latent side, e.g. 64 for 512px images
        self.channels = options.get("channels", 4)
        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval().requires_grad_(False)
        self.cond_stage_model = instantiate_from_config(cond_stage_config).eval().requires_grad_(False)
        self.num_timesteps = timesteps
        self.linear_start, self.linear_end = linear_start, linear_end
        self.scale_factor = scale_factor
        self.register_schedule()

    def register_schedule(self) -> None:
        """(Re)build the schedule buffers; they are derived from the config, so not saved in our state dict."""
        device = torch.device("cpu") if self.device.type == "meta" else self.device
        for name, value in make_schedule(self.linear_start, self.linear_end, self.num_timesteps).items():
            self.register_buffer(name, value.to(device), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        """.to(device, dtype) and friends: the weights follow; the schedule is rebuilt in float32 on the new device
        (in bf16/fp16, alpha_bar_t near 1 would round to exactly 1 and DDIM would divide by zero)."""
        super()._apply(fn, *args, **kwargs)
        self.register_schedule()
        return self

    def rebuild_buffers(self) -> None:
        """Recreate non-persistent buffers after the weights were assigned to a model built on `meta`."""
        self.register_schedule()
        self.cond_stage_model.rebuild_buffers()

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are (set once by the loader, from --device)."""
        return self.unet.out[-1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weight dtype (set once by the loader, from --precision)."""
        return self.unet.out[-1].weight.dtype

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """[C, h, w] of the latent of a square image of `image_size` pixels; UserError unless the size is a
        multiple of the VAE's factor times the UNet's downsampling (8 x 8 = 64 px for SD)."""
        f = 2 ** (len(self.first_stage_model.encoder.down) - 1)  # VAE downsampling factor, 8 for SD
        u = 2 ** sum(1 for m in self.unet.modules() if type(m).__name__ == "Downsample")  # UNet's, 8 for SD
        if image_size <= 0 or image_size % (f * u):
            step = f * u
            raise UserError(f"--image_size {image_size}: must be a positive multiple of {step} for this model "
                            f"(VAE factor {f} x UNet downsampling {u}); e.g. {max(1, round(image_size / step)) * step}")
        return (self.unet.in_channels, image_size // f, image_size // f)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t, c): x [B, 4, h, w], t [B] (DDPM timesteps), cond [B, 77, 768] -> [B, 4, h, w]."""
        return self.model(x, t, context=cond)

    @torch.no_grad()
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """[B] prompts -> [B, 77, 768] text context, in the UNet's dtype."""
        return self.cond_stage_model(prompts).to(self.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        s = self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a * x0 + s * noise

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, generator: torch.Generator | None = None,
                           sample: bool = True) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> scaled latent [B, 4, H/8, W/8] (a posterior sample, or its mean)."""
        posterior = self.first_stage_model.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent [B, 4, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)
