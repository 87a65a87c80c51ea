"""A metric's local weights file read safely: safetensors, or a torch state dict with weights_only=True (no code
from the file runs). Every failure is one line naming the file (UserError)."""
from pathlib import Path

import torch

from ldm.errors import UserError


def read_tensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """{name: tensor} of a local file; `what` names the file in errors ("Inception weights", "LPIPS weights")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a wrong file: one line
        raise UserError(f"{path}: not a weights file torch can read safely ({str(exc).splitlines()[0][:120]})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state
