"""Peak memory and seconds per iteration of erasure training: one copy of the model (ours) against the
release's two copies (a deep-copied frozen base model for e_0 / e_p), each in its own fresh subprocess. An
iteration is train.py's: `ldm.erasure.training.Trainer.step` (loss, backward, snapshot, Adam step).

    python -m scripts.bench.bench_train --config configs/tiny/tiny-inference.yaml --random_weights --image_size 16 \
        --ddim_steps 10 --t_enc 8 --threads 1
    python -m scripts.bench.bench_train --config configs/stable-diffusion/v1-inference.yaml --random_weights \
        --image_size 128 --t_enc 48 --iterations 3            # full SD v1 size, CPU: a few minutes
    python -m scripts.bench.bench_train --device cuda --ckpt models/sd-v1-4.ckpt   # 512 px, CUDA max allocated
    python -m scripts.bench.bench_train --method esd --train_method noxattn --config configs/tiny/tiny-inference.yaml \
        --random_weights --image_size 16 --ddim_steps 10 --threads 1      # ESD: full deltas vs ESD's two models

--method esd: "one" is ours (full-rank deltas on ESD's --train_method layers, deltas off for e_0 / e_p); "two" is
ESD's train-esd.py restated: the model's own parameters of that set are trained and a deep copy is the frozen
model. Expected peak: one copy = model + trained x (delta + 2 Adam moments + gradient + the loop's snapshot);
two copies = 2 x model + trained x (2 moments + gradient + snapshot).

t_enc is fixed (default S-2: one CFG DDIM step, then the two scoring calls and the trained call) so that an
iteration is short and both variants do identical work; the memory figure does not depend on t_enc.
Peak memory: train.py's measure (ldm/memory.py), each variant's own worker process: CUDA max allocated on
CUDA (kind cuda_max_allocated), else the process's peak RSS (cpu_peak_rss: everything, weights, text encoder,
VAE, activations, Python). Both variants hold the full LatentDiffusion model, as the release's train.py does.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ldm.cli import HelpFormatter

REPO = Path(__file__).resolve().parents[2]


def worker(a) -> dict:
    import torch

    from ldm.erasure.objective import UnGuideObjective, encode_prompts
    from ldm.erasure.training import Method, Trainer
    from ldm.loader import build_model, load_model_from_config, resolve_device
    from ldm.memory import memory_record

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    tic = time.perf_counter()
    if a.random_weights:
        model = build_model(a.config, device=device)
    else:
        model = load_model_from_config(a.config, a.ckpt, device=device, verbose=False)
    model.requires_grad_(False)
    frozen = copy.deepcopy(model) if a.variant == "two" else None  # the release's model_orig
    load_s = time.perf_counter() - tic
    tensors = trained_tensors(a, model)
    emb = encode_prompts(model, "a photo of the cat", "" if a.method == "esd" else "a photo of the forest")
    t_enc = a.t_enc if a.t_enc is not None else a.ddim_steps - 2
    objective = UnGuideObjective(model, emb, model.latent_shape(a.image_size), a.ddim_steps, fixed_t_enc=t_enc,
                                 frozen_model=frozen)
    method = Method(tensors, objective, save=lambda path, extra: None)
    trainer = Trainer(method, 3e-5, torch.Generator().manual_seed(0))  # train.py's loop, one step at a time
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        trainer.step()
    sync()
    times = []
    for _ in range(a.iterations):
        tic = time.perf_counter()
        trainer.step()
        sync()
        times.append(time.perf_counter() - tic)
    mem = memory_record(device)  # train.py's measure (ldm/memory.py): this worker process's own peak
    return {"variant": a.variant, "peak_bytes": mem["peak_memory_bytes"], "kind": mem["peak_memory_kind"], **mem,
            "s_per_it": sorted(times)[len(times) // 2],
            "s_per_it_all": times, "load_s": load_s, "t_enc": t_enc, "device": str(device),
            "threads": torch.get_num_threads(), "trained_params": sum(t.numel() for t in method.parameters()),
            "unet_params": sum(p.numel() for n, p in model.unet.named_parameters() if not is_delta(n))}


def is_delta(name: str) -> bool:
    return ".lora." in name


def trained_tensors(a, model) -> dict:
    """The tensors the variant trains: a LoRA (unguide), full deltas (esd, one copy) or, for ESD's two copies,
    the model's own parameters of the train_method set (requires_grad on)."""
    import torch

    from ldm.erasure.delta import delta_state_dict
    from ldm.erasure.full import inject_full
    from ldm.erasure.lora import inject_lora
    from ldm.erasure.targets import esd_layers, esd_parameter_names, select_targets
    if a.method == "unguide":
        inject_lora(model.unet, select_targets(model.unet, a.targets), rank=a.rank, alpha=8.0,
                    generator=torch.Generator().manual_seed(0))
    elif a.variant == "one":
        inject_full(model.unet, esd_layers(model.unet, a.train_method))
    else:
        params = dict(model.unet.named_parameters())
        return {n: params[n].requires_grad_(True) for n in esd_parameter_names(model.unet, a.train_method)}
    return delta_state_dict(model.unet, keep_vars=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"))
    p.add_argument("--ckpt", help="checkpoint (else --random_weights)")
    p.add_argument("--random_weights", action="store_true", help="freshly initialised weights (no checkpoint)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--t_enc", type=int, default=None, help="fixed DDIM index (default S-2: one sampling step)")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--targets", nargs="+", default=["default"])
    p.add_argument("--method", choices=["unguide", "esd"], default="unguide")
    p.add_argument("--train_method", choices=["xattn", "noxattn", "selfattn", "full"], default="xattn",
                   help="--method esd: ESD's parameter set")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--variants", nargs="+", default=["two", "one"], choices=["one", "two"])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_worker", dest="variant", choices=["one", "two"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if not a.random_weights and not a.ckpt:
        p.error("give --ckpt, or --random_weights")
    if a.variant:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return

    results = {}
    for v in a.variants:
        argv = [sys.executable, "-m", "scripts.bench.bench_train", "--_worker", v] + [x for x in sys.argv[1:] if x != "--variants"
                                                             and x not in ("one", "two")]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{v}: worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[v] = json.loads(line[len("RESULT "):])
        print(f"done: {v} copy", file=sys.stderr, flush=True)

    r0 = next(iter(results.values()))
    print(f"config {Path(a.config).name} ({'random weights' if a.random_weights else a.ckpt}), "
          f"UNet {r0['unet_params'] / 1e6:.0f}M params, image {a.image_size} px, S={a.ddim_steps}, fixed t_enc "
          f"{r0['t_enc']}, device {r0['device']} ({r0['threads']} threads), "
          + (f"ESD-{a.train_method}, {r0['trained_params'] / 1e6:.2f}M trained params" if a.method == "esd"
             else f"targets {' '.join(a.targets)} rank {a.rank}")
          + f"; median of {a.iterations} iterations after {a.warmup} warm-up; memory: {r0['kind']}")
    print(f"{'variant':<28}{'peak memory (GiB)':>19}{'s / iteration':>15}")
    names = {"two": "two copies (ESD's)" if a.method == "esd" else "two copies (release)", "one": "one copy (ours)"}
    for v, r in results.items():
        print(f"{names[v]:<28}{r['peak_bytes'] / 2 ** 30:>19.3f}{r['s_per_it']:>15.3f}")
    if "one" in results and "two" in results:
        o, t = results["one"], results["two"]
        print(f"{'ratio one / two':<28}{o['peak_bytes'] / t['peak_bytes']:>19.3f}{o['s_per_it'] / t['s_per_it']:>15.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
