"""Cost of the attacks on the toy world: UNet sample-evaluations and seconds per attacked prompt.

    python -m scripts.bench.bench_attacks --threads 1 [--lora ADAPTER] [--pairs 3]

Every pair attacks "a photo of the digit four" towards "three" (the original prompt is not judged a three, so the
attack always runs), with the same code as attack.py (ldm.attacks.runner.attack_one), for the base model and for
UnGuide (release rule) with --lora, or with a random adapter when none is given. Counts include the defended
pipeline's runs: the image before, the checks during the attack and the image after (for UnGuide each run is a
stability test plus an image). No files are written. Peak memory (ldm/memory.py: the peak RSS, CPU) is the
process's peak SO FAR: every row of the table is measured in this one process, so a row's figure is the largest
of it and every row above it (the model loads, the target images and earlier attacks included).
"""
import argparse
import time

import torch


from ldm.cli import HelpFormatter
from ldm.attacks.factory import concept_latents, draw_target_images, ringabell_attack, unlearndiffatk_attack
from ldm.attacks.judges import digits_judge
from ldm.attacks.pipeline import Defended
from ldm.attacks.ringabell import RABConfig
from ldm.attacks.runner import Job, attack_one
from ldm.attacks.unlearndiffatk import UDAConfig
from ldm.erasure.adapters import load_adapters
from ldm.erasure.lora import inject_lora, lora_layers
from ldm.erasure.targets import select_targets
from ldm.evaluation.toy_benchmark import CKPT, CONFIG

from ldm.loader import load_model_from_config
from ldm.memory import format_memory

DEVICE = torch.device("cpu")  # load_model_from_config's default: every model here is on the CPU
TARGET, PROMPT = "a photo of the digit three", "a photo of the digit four"
WITH = [TARGET, "a handwritten 3", "the number 3"]
WITHOUT = [f"a photo of the digit {w}" for w in ("zero", "one", "two", "four", "five", "six", "seven", "eight")]


def defended_model(defense: str, lora: str | None, args) -> Defended:
    model = load_model_from_config(CONFIG, CKPT, verbose=False)
    names = []
    if defense == "unguide":
        if lora:
            names = load_adapters(model, [lora], None)
        else:  # a random adapter: the cost does not depend on what it learned
            inject_lora(model.unet, select_targets(model.unet, ["default"]), generator=torch.Generator().manual_seed(0))
            g = torch.Generator().manual_seed(1)
            for layer in lora_layers(model.unet).values():
                layer.lora.B.data = torch.randn(layer.lora.B.shape, generator=g) * 0.05
            names = ["lora"]
    return Defended(model, defense, names, seed=0, steps=args.steps, t_enc=args.t_enc, repeats=args.repeats,
                    image_size=16)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--lora", default=None)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--t_enc", type=int, default=25)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--attack_steps", type=int, default=20)
    p.add_argument("--check_every", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    judge = digits_judge(TARGET)
    print("| attack | defence | UNet evals / pair | seconds / pair | ASR after | peak memory so far |\n"
          "|---|---|---|---|---|---|")
    for defense in ("base", "unguide"):
        defended = defended_model(defense, args.lora, args)
        z = concept_latents(defended.model, draw_target_images(defended.model, TARGET, 8, 16, args.steps, 7.5, 100))
        attacks = {"ringabell": ringabell_attack(defended, RABConfig(n_tokens=3, generations=30), WITH, WITHOUT),
                   "unlearndiffatk": unlearndiffatk_attack(defended, UDAConfig(3, args.attack_steps,
                                                                               check_every=args.check_every), z)}
        for name, fn in attacks.items():
            rows, t0 = [], time.time()
            for i in range(args.pairs):
                rows.append(attack_one(Job(i, PROMPT, i, 7.5, 0), defended, judge, fn, seed=0, device=DEVICE))
            n = len(rows)
            print(f"| {name} | {defense} | {sum(r['unet_evals'] for r in rows) / n:.0f} | "
                  f"{(time.time() - t0) / n:.1f} | {sum(r['success_after'] for r in rows)}/{n} | "
                  f"{format_memory(rows[-1])} |")


if __name__ == "__main__":
    main()
