"""Peak memory of the checkpoint loader at full SD v1 size, against a naive two-copy loader.

    python -m scripts.bench.bench_load [--config configs/stable-diffusion/v1-inference.yaml] [--tmpdir /tmp]

1. A fresh process builds the model of --config with random weights and saves its released state dict as a
   temporary fp32 .ckpt ({"state_dict": ..., "global_step": 0}) under --tmpdir (~4.3 GB for SD v1).
2. Each loader runs in its own fresh process, which reports its peak resident set size (getrusage ru_maxrss):
     import only : python + torch + ldm imported, nothing loaded (the floor every process pays)
     ours        : ldm.loader.load_model_from_config (modules built on meta, tensors of the memory-mapped file assigned)
     naive       : build the model randomly initialised, torch.load without mmap, load_state_dict (two copies)
   After loading, every weight is read once (a sum per tensor) so that memory-mapped pages count as resident,
   as they will during sampling; the peak covers loading and that pass.
3. The temporary checkpoint is deleted at the end (also on errors and Ctrl-C).

Ratios are to one model's size (the bytes of its state dict). Needs RAM for the naive loader: ~2.2 model sizes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldm.cli import HelpFormatter
from ldm.memory import peak_rss_bytes  # the scripts' cpu_peak_rss (getrusage ru_maxrss)

REPO = Path(__file__).resolve().parents[2]
GB = 1024 ** 3


def rss_breakdown() -> dict:
    """Current RSS split into anonymous memory and file-backed (page-cache, evictable) pages, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                name, kib = line.split()[:2]
                out[name.rstrip(":")] = int(kib) * 1024
    return out


def touch_all(model) -> float:
    """Read every parameter and buffer once (pages memory-mapped weights in); returns a checksum."""
    import torch

    with torch.no_grad():
        return float(sum(t.double().sum() for t in list(model.parameters()) + list(model.buffers())))


def child(mode: str, config: str, ckpt: str) -> dict:
    import torch

    import ldm.loader  # noqa: F401  (the imports every mode pays, the model's classes included)
    import ldm.models.autoencoder  # noqa: F401
    import ldm.modules.diffusionmodules.openaimodel  # noqa: F401
    import ldm.modules.encoders.modules  # noqa: F401
    from ldm.loader import build_model, load_model_from_config

    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = {"mode": mode}
    if mode == "save":
        from ldm.loader import release_state_dict

        model = build_model(config)
        sd = release_state_dict(model)
        result["state_dict_bytes"] = sum(v.numel() * v.element_size() for v in sd.values())
        result["unet_params"] = sum(p.numel() for p in model.unet.parameters())
        result["tensors"] = len(sd)
        torch.save({"state_dict": sd, "global_step": 0}, ckpt)
        result["file_bytes"] = os.path.getsize(ckpt)
    elif mode == "import":
        pass
    elif mode == "ours":
        model = load_model_from_config(config, ckpt, verbose=False)
        result["load_s"] = time.perf_counter() - t0
        result["peak_after_load"] = peak_rss_bytes()
        result["checksum"] = touch_all(model)
    elif mode == "naive":
        from ldm.loader import release_key

        model = build_model(config)  # a randomly initialised copy ...
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)  # ... and a second one, read into memory
        sd = obj["state_dict"]
        model.load_state_dict({k: sd[release_key(k)] for k in model.state_dict()}, strict=True)
        del obj, sd
        result["load_s"] = time.perf_counter() - t0
        result["peak_after_load"] = peak_rss_bytes()
        result["checksum"] = touch_all(model)
    else:
        raise ValueError(mode)
    result["total_s"] = time.perf_counter() - t0
    result["peak"] = peak_rss_bytes()
    result.update(rss_breakdown())
    return result


def run_child(mode: str, config: str, ckpt: str) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench.bench_load", "--config", config, "--_child", mode, "--_ckpt", ckpt]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"))
    p.add_argument("--tmpdir", default="/tmp", help="where the temporary checkpoint goes (needs ~4.3 GB free)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(args._child, args.config, args._ckpt)))
        return

    folder = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.tmpdir))
    ckpt = str(folder / "random-weights.ckpt")
    try:
        t = time.perf_counter()
        saved = run_child("save", args.config, ckpt)
        size = saved["state_dict_bytes"]
        print(f"config {args.config}: UNet {saved['unet_params']:,} parameters; state dict {saved['tensors']} tensors, "
              f"{size / GB:.3f} GiB fp32; checkpoint file {saved['file_bytes'] / GB:.3f} GiB "
              f"(built and saved in {time.perf_counter() - t:.0f} s)", flush=True)
        rows = [run_child(mode, args.config, ckpt) for mode in ("import", "ours", "naive")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    floor = rows[0]["peak"]
    names = {"import": "import only (python + torch + ldm)", "ours": "ours: load_model_from_config",
             "naive": "naive: random init + torch.load + load_state_dict"}
    header = (f"{'loader':<52} {'peak RSS GiB':>12} {'peak/model':>10} {'(peak-import)/model':>19} "
              f"{'RSS anon/file GiB after':>24} {'load s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        anon_file = f"{r.get('RssAnon', 0) / GB:.2f} / {r.get('RssFile', 0) / GB:.2f}"
        load_s = f"{r['load_s']:.1f}" if "load_s" in r else "-"
        print(f"{names[r['mode']]:<52} {r['peak'] / GB:>12.2f} {r['peak'] / size:>10.2f} "
              f"{(r['peak'] - floor) / size:>19.2f} {anon_file:>24} {load_s:>7}")
    ours, naive = rows[1], rows[2]
    assert abs(ours["checksum"] - naive["checksum"]) <= 1e-6 * max(1.0, abs(naive["checksum"])), "loaders disagree"
    print(f"model size (state dict) {size / GB:.3f} GiB; both loaders give the same weights (checksum "
          f"{ours['checksum']:.6g}); ours peaks at {(ours['peak'] - floor) / GB:.2f} GiB above the import floor, "
          f"naive at {(naive['peak'] - floor) / GB:.2f} GiB")


if __name__ == "__main__":
    main()
