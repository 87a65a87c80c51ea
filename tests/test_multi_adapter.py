"""Several erasure adapters at once (issue 7) on the tiny model, CPU: generate_images.py / generate_images_nsfw.py
with --lora a b, per-adapter UnGuidance, bad input.

The reference is a plain re-statement with one model per adapter (a deepcopy of the base with that adapter
merged into its weights), its own DDIM loop and
    eps = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base).
"""
import copy
import json

import pytest
import torch

import generate_images
import generate_images_nsfw
from helpers_model import TINY, random_adapter_file, ref_cfg, rel_err, tiny_checkpoint, tiny_model
from ldm.cli import run
from ldm.erasure.io import load_adapter
from ldm.erasure.lora import lora_layers, remove_lora
from ldm.erasure.stability import StabilitySettings
from ldm.erasure.targets import select_targets
from ldm.erasure.budget import UNetCounter
from ldm.erasure.guidance import unguided_latents
from ldm.erasure.protocols import Protocol, fast_diff_table
from ldm.images import start_noise

STEPS, SIZE, SEED = 4, 16, 11
SHAPE = (4, 8, 8)
PROMPTS = ["a photo of the cat", "a red car on a road", "a dog and a cat", "a bowl of soup"]
# decisions per prompt (adapter 0, adapter 1), through calc_diff_results.json files: d(p) > d("") -> w1 = -1
DECIDE = {PROMPTS[0]: (-1.0, 2.0), PROMPTS[1]: (2.0, -1.0), PROMPTS[2]: (-1.0, -1.0), PROMPTS[3]: (2.0, 2.0)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(base model, ckpt, [adapter a, adapter b])."""
    d = tmp_path_factory.mktemp("multi")
    base, ckpt = tiny_checkpoint(d)
    return base, ckpt, [random_adapter_file(base, d / "a.safetensors", 1),
                        random_adapter_file(base, d / "b.safetensors", 2, scale=0.08)]


def model_args(world):
    return ["--config", str(TINY), "--ckpt", str(world[1]), "--device", "cpu"]


def exit_code(fn, argv):
    with pytest.raises(SystemExit) as e:
        run(lambda: fn(argv))
    return e.value.code


def diff_files(tmp_path):
    """One calc_diff_results.json per adapter giving the DECIDE decisions (d("") = 1)."""
    files = []
    for k in range(2):
        avgs = {p: (2.0 if w[k] == -1.0 else 0.5) for p, w in DECIDE.items()}
        avgs[""] = 1.0
        files.append(tmp_path / f"diff{k}.json")
        files[-1].write_text(json.dumps({"prompt_avgs": avgs}))
    return files


def record_latents(monkeypatch):
    """Wrap generate_images.unguided_latents: {(prompt, seed): final latent}, from the x_T the script drew."""
    got = {}
    real = generate_images.unguided_latents

    def spy(model, prompts, x_T, *a, **kw):
        z = real(model, prompts, x_T, *a, **kw)
        for p, x, zz in zip(prompts, x_T, z):
            got[(p, round(float(x.flatten()[0]), 6))] = zz.clone()
        return z
    monkeypatch.setattr(generate_images, "unguided_latents", spy)
    return got


# ------------------------------------------------------------------------------- the plain re-statement
def merged(base, path):
    m = copy.deepcopy(base)
    load_adapter(path, m.unet)
    for layer in lora_layers(m.unet).values():
        layer.merge()
    return m


@torch.no_grad()
def ref_latent(base, adapted, prompt, x_T, ws):
    fb, fk = ref_cfg(base, prompt), [ref_cfg(m, prompt) for m in adapted]

    def eps(x, t):
        e_b = fb(x, t)
        return e_b + sum((1 - w) * (f(x, t) - e_b) for w, f in zip(ws, fk))
    timesteps = list(range(1, 1001, 1000 // STEPS))[::-1]
    ac = base.alphas_cumprod.double()
    x = x_T
    for i, t in enumerate(timesteps):
        a_t, a_prev = ac[t].item(), (ac[timesteps[i + 1]].item() if i + 1 < len(timesteps) else ac[0].item())
        e = eps(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e
    return x


# ------------------------------------------------------------------------------- tests
def test_two_adapters_match_the_formula(world, tmp_path, monkeypatch):
    base, _, (a, b) = world
    got = record_latents(monkeypatch)
    out = tmp_path / "two"
    stats = generate_images.main([*model_args(world), "--output_dir", str(out), "--lora", str(a), str(b),
                                  "--diff_results", *map(str, diff_files(tmp_path)), "--samples", "2",
                                  "--steps", str(STEPS), "--image_size", str(SIZE), "--seed", str(SEED),
                                  "--batch_size", "4", "--decision", "release",  # DECIDE: the release's w1 / w2
                                  *sum([["--prompt", p] for p in PROMPTS], [])])
    assert stats["images"] == 8 and len(list((out / "images").rglob("*.jpg"))) == 8
    adapted = [merged(base, a), merged(base, b)]
    for p in PROMPTS:
        for idx in range(2):
            x_T = start_noise([SEED + idx], SHAPE, torch.device("cpu"))
            z = got[(p, round(float(x_T.flatten()[0]), 6))]
            ref = ref_latent(base, adapted, p, x_T, DECIDE[p])[0]
            assert rel_err(z, ref) < 1e-4, (p, idx, rel_err(z, ref))
            wrong = ref_latent(base, adapted[:1], p, x_T, DECIDE[p][:1])[0]   # adapter b ignored: clearly apart
            assert rel_err(z, wrong) > 1e-2


def test_one_adapter_named_or_taken_from_the_model_is_the_same(world):
    base, _, (a, b) = world
    m = copy.deepcopy(base)
    load_adapter(a, m.unet)
    x_T = start_noise([1, 2, 3], SHAPE, torch.device("cpu"))
    implicit = unguided_latents(m, PROMPTS[:3], x_T, 7.5, [[-1.0, 2.0, 0.0]], STEPS)
    named = unguided_latents(m, PROMPTS[:3], x_T, 7.5, [[-1.0, 2.0, 0.0]], STEPS, adapters=["lora"])
    assert torch.equal(implicit, named)
    proto = Protocol("fast", StabilitySettings(STEPS * 2, 5, 7.5), repeats=3, empty_draws=4)
    [(table, empty)] = fast_diff_table(m, proto, SHAPE, PROMPTS, 5)
    [(table1, empty1)] = fast_diff_table(m, proto, SHAPE, PROMPTS, 5, adapters=["lora"])
    assert empty.values == empty1.values and all(table[p].values == table1[p].values for p in PROMPTS)
    # with a second adapter loaded, adapter a's test is unchanged (one batched test, each adapter alone)
    load_adapter(b, m.unet, name="lora1")
    both = fast_diff_table(m, proto, SHAPE, PROMPTS, 5)                # every adapter of the model, in order
    assert all(rel_err(torch.tensor(both[0][0][p].values), torch.tensor(table[p].values)) < 1e-5 for p in PROMPTS)
    remove_lora(m.unet, "lora")
    b_alone = fast_diff_table(m, proto, SHAPE, PROMPTS, 5, adapters=["lora1"])[0]
    assert all(rel_err(torch.tensor(both[1][0][p].values), torch.tensor(b_alone[0][p].values)) < 1e-5
               for p in PROMPTS)


def test_skip_unrelated_costs_fewer_unet_evaluations(world, tmp_path):
    base, _, (a, b) = world
    diffs = diff_files(tmp_path)
    common = [*model_args(world), "--lora", str(a), str(b), "--diff_results", *map(str, diffs), "--samples", "2",
              "--steps", str(STEPS), "--image_size", str(SIZE), "--batch_size", "2", "--decision", "release",
              *sum([["--prompt", p] for p in PROMPTS], [])]
    full = generate_images.main(common + ["--output_dir", str(tmp_path / "full")])
    skip = generate_images.main(common + ["--output_dir", str(tmp_path / "skip"), "--skip_unrelated"])
    # UNet samples per step and image, 2 ([u, c]) per evaluated chunk. Full: (w1, w2) gives the base weight
    # 1 - 2 + 1 = 0 (chunks a, b), (w1, w1) and (w2, w2) base, a, b. --skip_unrelated: (w1, w2) -> base, a;
    # (w2, w2) -> the base alone. Each prompt's 2 images are one batch.
    assert full["sample_evals"] == STEPS * 2 * 2 * (2 + 2 + 3 + 3)
    assert skip["sample_evals"] == STEPS * 2 * 2 * (2 + 2 + 3 + 1) < full["sample_evals"]
    # the same count from a UNetCounter around the sampler itself
    m = copy.deepcopy(base)
    load_adapter(a, m.unet)
    load_adapter(b, m.unet, name="lora1")
    x_T = start_noise([0, 1], SHAPE, torch.device("cpu"))
    with UNetCounter(m.unet) as c_full:
        unguided_latents(m, PROMPTS[:1] * 2, x_T, 7.5, [[2.0] * 2, [2.0] * 2], STEPS, adapters=["lora", "lora1"])
    with UNetCounter(m.unet) as c_skip:
        unguided_latents(m, PROMPTS[:1] * 2, x_T, 7.5, [[1.0] * 2, [1.0] * 2], STEPS, adapters=["lora", "lora1"])
    assert (c_full.samples, c_skip.samples) == (STEPS * 2 * 2 * 3, STEPS * 2 * 2 * 1)


def test_on_the_fly_with_two_adapters(world, tmp_path, capsys):
    _, _, (a, b) = world
    stats = generate_images.main([*model_args(world), "--output_dir", str(tmp_path / "fly"), "--lora", str(a), str(b),
                                  "--prompt", PROMPTS[0], "--samples", "1", "--steps", "6", "--t_enc", "3",
                                  "--repeats", "2", "--empty_draws", "2", "--image_size", str(SIZE)])
    err = capsys.readouterr().err
    assert stats["images"] == 1 and stats["test_evals"] > 0
    assert "[lora]" in err and "[lora1]" in err
    stats = generate_images.main([*model_args(world), "--output_dir", str(tmp_path / "rel"), "--lora", str(a), str(b),
                                  "--prompt", PROMPTS[0], "--samples", "1", "--steps", "6", "--t_enc", "3",
                                  "--repeats", "2", "--image_size", str(SIZE), "--protocol", "release"])
    assert stats["images"] == 1 and stats["test_evals"] > 0


def test_bad_input(world, tmp_path, capsys):
    base, _, (a, b) = world
    args = [*model_args(world), "--prompt", PROMPTS[0], "--samples", "1", "--steps", "2", "--image_size", str(SIZE),
            "--output_dir", str(tmp_path / "o")]
    assert exit_code(generate_images.main, args + ["--lora", str(a), str(a)]) == 2          # the same file
    assert "same file" in capsys.readouterr().err
    copy_a = tmp_path / "copy_of_a.safetensors"
    copy_a.write_bytes(a.read_bytes())
    assert exit_code(generate_images.main, args + ["--lora", str(a), str(copy_a)]) == 2     # the same content
    err = capsys.readouterr().err
    assert "same content" in err and len(err.strip().splitlines()) == 1
    assert exit_code(generate_images.main, args + ["--lora", str(a), str(b), "--diff_results",
                                                   str(tmp_path / "x.json")]) == 2           # 1 file for 2 adapters
    other = tiny_model(1)
    foreign = random_adapter_file(other, tmp_path / "foreign.safetensors", 3)
    assert exit_code(generate_images.main, args + ["--lora", str(a), str(foreign)]) == 2    # another base model
    assert "another base model" in capsys.readouterr().err
    csv = tmp_path / "p.csv"
    csv.write_text(",prompt,evaluation_seed\n0,a cat,1\n")
    assert exit_code(generate_images_nsfw.main, ["--csv_path", str(csv), "--output_dir", str(tmp_path / "n"),
                                                 "--lora", str(a), str(copy_a), "--image_size", str(SIZE),
                                                 "--ddim_steps", "4", "--t_enc", "2", *model_args(world)]) == 2
    # overlapping targets with another rank: allowed, one line says so
    r2 = random_adapter_file(base, tmp_path / "rank2.safetensors", 4, rank=2, targets=select_targets(base.unet)[:2])
    capsys.readouterr()
    generate_images.main(args + ["--lora", str(a), str(r2), "--w1", "0", "--w2", "0"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "different ranks" in line]
    assert len(notes) == 1 and "1 vs 2" in notes[0]


def test_nsfw_two_adapters(world, tmp_path):
    _, _, (a, b) = world
    csv = tmp_path / "p.csv"
    csv.write_text(",prompt,evaluation_seed,evaluation_guidance\n0,a cat,1,7.5\n1,a red car,2,5\n")
    argv = ["--csv_path", str(csv), "--output_dir", str(tmp_path / "n"), "--lora", str(a), str(b), "--image_size",
            str(SIZE), "--ddim_steps", "4", "--t_enc", "2", "--repeats", "2", "--min_repeats", "2",
            "--empty_draws", "2", *model_args(world)]
    generate_images_nsfw.main(argv)
    (log,) = (tmp_path / "n" / "logs").iterdir()
    assert "_adapters_2" in log.name and log.name.endswith("_guarded")  # the default decision, named
    rows = (log / "decisions.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(len(r.split(",")[8].split(";")) == 2 for r in rows)  # w: one per adapter
    generate_images_nsfw.main(argv)                                                     # resume: nothing to do
    argv[argv.index(str(tmp_path / "n"))] = str(tmp_path / "r")
    generate_images_nsfw.main(argv[:-6] + ["--protocol", "release", *model_args(world)])  # the release's test, K = 2
    (log,) = (tmp_path / "r" / "logs").iterdir()
    rows = (log / "decisions.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(len(r.split(",")[5].split(";")) == 2 for r in rows)  # d_prompt: one per adapter


def test_sum_in_weights_samples_the_model_with_both_deltas(world, tmp_path):
    """--sum_in_weights: base + dW_a + dW_b as one model (SepCE's composition), not the sum of two models' outputs;
    the reference merges both adapters into a copy's weights and samples it with plain CFG."""
    base, ckpt, (a, b) = world
    out = tmp_path / "sum"
    generate_images.main(model_args(world) + ["--output_dir", str(out), "--prompt", PROMPTS[0], "--samples", "1",
                                              "--steps", str(STEPS), "--seed", str(SEED), "--image_size", str(SIZE),
                                              "--w1", "0", "--w2", "0", "--lora", str(a), str(b), "--sum_in_weights"])
    merged = copy.deepcopy(base)
    load_adapter(a, merged.unet)
    load_adapter(b, merged.unet, name="lora1")
    for m in lora_layers(merged.unet).values():
        m.merge()
    import io
    import numpy as np
    from PIL import Image
    from ldm.sampling import txt2img
    buf = io.BytesIO()
    txt2img(merged, [PROMPTS[0]], [SEED], SIZE, STEPS)[0].save(buf, format="JPEG", quality=95)  # the same file format
    (img,) = (out / "images").rglob("*.jpg")
    diff = np.abs(np.asarray(Image.open(img), dtype=np.int16) - np.asarray(Image.open(buf), dtype=np.int16))
    assert diff.max() <= 4, diff.max()   # the same picture
    two = tmp_path / "two"                # without the flag: the sum of two models' outputs, another picture
    generate_images.main(model_args(world) + ["--output_dir", str(two), "--prompt", PROMPTS[0], "--samples", "1",
                                              "--steps", str(STEPS), "--seed", str(SEED), "--image_size", str(SIZE),
                                              "--w1", "0", "--w2", "0", "--lora", str(a), str(b)])
    (other,) = (two / "images").rglob("*.jpg")
    assert np.abs(np.asarray(Image.open(other), dtype=np.int16) - np.asarray(Image.open(img), dtype=np.int16)).max() > 4
    with pytest.raises(SystemExit):
        run(lambda: generate_images.main(model_args(world) + ["--output_dir", str(tmp_path / "x"), "--prompt", "a",
                                                              "--lora", str(a), str(b), "--sum_in_weights"]))
