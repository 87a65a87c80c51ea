"""UnGuidance orchestration (ldm/erasure/protocols.py, budget.py, guidance.py and the three scripts) on the tiny
model, CPU.

The reference for every protocol is a plain re-statement of the formulas with TWO models (the base model and a
deepcopy with the adapter merged into its weights), its own DDIM loop and its own draws.
"""
import copy
import csv
import json

import pytest
import torch

import compute_lora_diff
import generate_images
import generate_images_nsfw
from ldm.prompts import read_rows
from helpers_model import (TINY, check_peak_memory, randomize_adapters, ref_cfg, rel_err, tiny_checkpoint,
                           tiny_model)
from ldm.cli import run
from ldm.erasure.io import load_adapter, save_adapter
from ldm.erasure.lora import inject_lora, lora_layers
from ldm.erasure.stability import Estimate, StabilitySettings
from ldm.erasure.targets import select_targets
from ldm.erasure.budget import UNetCounter, evals_per_draw, evals_per_image, repeats_within_budget
from ldm.erasure.guidance import decide, unguided_latents
from ldm.erasure.protocols import (Protocol, estimate_empty, fast_prompt_estimates, release_diff_table,
                                   release_row_estimates)

S, T_ENC, SIZE = 10, 6, 16         # DDIM steps, t_enc, image size (latent 8x8 with the tiny config)
SHAPE = (4, 8, 8)
PROMPTS = ["a photo of a nude person", "a red car on a road", "sketch, sad, alone 🪦"]
SEEDS = [4261553411, 7, 2 ** 32 - 1]
GUIDANCE = [13.0, 7.0, 1.0]


def _add_adapter(model, seed=1, scale=0.05):
    inject_lora(model.unet, select_targets(model.unet), 1, 8.0)
    return randomize_adapters(model, seed, scale)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(one-copy model with adapter, base model, merged model, ckpt path, adapter path)."""
    d = tmp_path_factory.mktemp("ug")
    base, ckpt = tiny_checkpoint(d)
    adapted = _add_adapter(copy.deepcopy(base))
    lora = d / "lora.safetensors"
    save_adapter(lora, adapted.unet, alpha=8.0)
    one = copy.deepcopy(base)
    load_adapter(lora, one.unet)
    merged = copy.deepcopy(base)
    load_adapter(lora, merged.unet)
    for layer in lora_layers(merged.unet).values():
        layer.merge()
    return one, base, merged, ckpt, lora


# ------------------------------------------------------------------------------- the plain re-statement
def ref_timesteps(release: bool) -> list[int]:
    steps = list(range(1, 1001, 1000 // S))[::-1]          # 901, 801, ..., 1
    return steps[1:] if release else steps                   # the release drops the noisiest


def ref_partial(release: bool) -> int:
    return S - T_ENC if release else S - 1 - T_ENC


@torch.no_grad()
def ref_ddim(eps_fn, x, timesteps, ac, stop=None):
    for i, t in enumerate(timesteps[:stop]):
        a_t = ac[t].item()
        a_prev = ac[timesteps[i + 1]].item() if i + 1 < len(timesteps) else ac[0].item()
        e = eps_fn(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e
    return x


@torch.no_grad()
def ref_d(base, merged, prompt, x_T, t, scale, release):
    z = ref_ddim(ref_cfg(base, prompt, scale), x_T, ref_timesteps(release), base.alphas_cumprod.double(),
                 ref_partial(release))
    c = base.get_learned_conditioning([prompt]).expand(len(z), -1, -1)
    tt = torch.full((len(z),), int(t)) if not isinstance(t, torch.Tensor) or t.dim() == 0 else t
    return (merged.apply_model(z, tt, c) - base.apply_model(z, tt, c)).flatten(1).norm(dim=1)


@torch.no_grad()
def ref_image_latent(base, merged, prompt, x_T, scale, w, release):
    fb, fa = ref_cfg(base, prompt, scale), ref_cfg(merged, prompt, scale)
    return ref_ddim(lambda x, t: w * fb(x, t) + (1 - w) * fa(x, t), x_T, ref_timesteps(release),
                    base.alphas_cumprod.double())


def ref_draws(seed, n):
    gx, gt = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    lo, hi = round(T_ENC / S * 1000), round((T_ENC + 1) / S * 1000)
    xs = [torch.randn((1, *SHAPE), generator=gx) for _ in range(n)]
    ts = [int(torch.randint(lo, hi, (1,), generator=gt)) for _ in range(n)]
    return torch.cat(xs), ts


def settings(release=False):
    return StabilitySettings(S, T_ENC, 7.5, 0.0, release)


# ------------------------------------------------------------------------------- exactness
def test_fast_path_matches_two_model_formulas(models):
    one, base, merged, *_ = models
    proto = Protocol("fast", settings(), repeats=3, empty_draws=4)
    with UNetCounter(one.unet) as c:
        [d_empty] = estimate_empty(one, proto, SHAPE, 0)
    assert c.samples == 4 * (ref_partial(False) * 1 + 2)      # "" trajectory: one sample per step
    x, ts = ref_draws(0, 4)
    ref_empty = torch.cat([ref_d(base, merged, "", x[i:i + 1], ts[i], 7.5, False) for i in range(4)])
    assert rel_err(torch.tensor(d_empty.values), ref_empty) < 1e-4
    with UNetCounter(one.unet) as c:
        [est] = fast_prompt_estimates(one, proto, SHAPE, PROMPTS, SEEDS, GUIDANCE, [d_empty])
    assert c.samples == 3 * 3 * (2 * ref_partial(False) + 2)
    ws = [decide(e.mean, d_empty.mean, -1.0, 2.0) for e in est]
    x_T = torch.cat([ref_draws(s, 1)[0] for s in SEEDS])
    z = unguided_latents(one, PROMPTS, x_T, GUIDANCE, [ws], S)
    ref_means = []
    for k, (p, s, g) in enumerate(zip(PROMPTS, SEEDS, GUIDANCE)):
        x, ts = ref_draws(s, 3)
        ref = torch.cat([ref_d(base, merged, p, x[i:i + 1], ts[i], g, False) for i in range(3)])
        assert rel_err(torch.tensor(est[k].values), ref) < 1e-4
        ref_means.append(ref.mean().item())
        ref_w = decide(ref.mean(), ref_empty.mean(), -1.0, 2.0)
        assert ws[k] == ref_w
        ref_z = ref_image_latent(base, merged, p, x[:1], g, ref_w, False)
        assert rel_err(z[k:k + 1], ref_z) < 1e-4, p
    # with a threshold between the prompts' means both decisions occur, and ours equal the reference's
    ours = sorted(e.mean for e in est)
    thr = (ours[0] + ours[1]) / 2
    assert [decide(e.mean, thr, -1.0, 2.0) for e in est] == [decide(m, thr, -1.0, 2.0) for m in ref_means]
    assert {decide(e.mean, thr, -1.0, 2.0) for e in est} == {-1.0, 2.0}


@pytest.mark.parametrize("w", [0.0, 1.0, -1.0, 2.0])
def test_latents_match_for_every_w(models, w):
    one, base, merged, *_ = models
    x = ref_draws(5, 1)[0]
    with UNetCounter(one.unet) as c:
        z = unguided_latents(one, [PROMPTS[0]], x, 7.5, [w], S)
    assert c.samples == S * (2 if w in (0.0, 1.0) else 4)     # w = 1 or 0: half the cost
    assert rel_err(z, ref_image_latent(base, merged, PROMPTS[0], x, 7.5, w, False)) < 1e-4


def test_release_rows_match_two_model_release_procedure(models):
    one, base, merged, *_ = models
    r = 3
    proto = Protocol("release", settings(True), repeats=r)
    with UNetCounter(one.unet) as c:
        [pairs] = release_row_estimates(one, proto, SHAPE, PROMPTS, SEEDS, GUIDANCE)
    assert c.samples == len(PROMPTS) * r * 2 * (2 * ref_partial(True) + 2)
    lo, hi = round(T_ENC / S * 1000), round((T_ENC + 1) / S * 1000)
    for (dp, de), p, s, g in zip(pairs, PROMPTS, SEEDS, GUIDANCE):
        gen = torch.Generator().manual_seed(s)
        t = torch.randint(lo, hi, (1,), generator=torch.Generator().manual_seed(s))
        rp, re_ = [], []
        first = None
        for _ in range(r):
            codes = torch.randn((1, *SHAPE), generator=gen)
            first = codes if first is None else first
            rp.append(ref_d(base, merged, p, codes, t, g, True))
            re_.append(ref_d(base, merged, "", codes, t, g, True))
        rp, re_ = torch.cat(rp), torch.cat(re_)
        assert rel_err(torch.tensor(dp.values), rp) < 1e-4 and rel_err(torch.tensor(de.values), re_) < 1e-4
        w = decide(rp.mean(), re_.mean(), -1.0, 2.0)
        assert decide(dp.mean, de.mean, -1.0, 2.0) == w
        z = unguided_latents(one, [p], first, g, [w], S, release_schedule=True)
        assert rel_err(z, ref_image_latent(base, merged, p, first, g, w, True)) < 1e-4


def test_release_diff_table_matches_release_procedure(models):
    """Three chunks of the release's compute_lora_diff: one generator draws each chunk's start codes and t, and its
    DDIM sampler, handed the same generator, draws one noise tensor per step for each prompt in turn (discarded at
    eta 0), so the next chunk's start codes come after those draws."""
    one, base, merged, *_ = models
    proto = Protocol("release", settings(True), repeats=6)
    prompts = ["a photo of the horse", ""]
    [table] = release_diff_table(one, proto, SHAPE, prompts, 42, 2)
    gen = torch.Generator().manual_seed(42)
    lo, hi = round(T_ENC / S * 1000), round((T_ENC + 1) / S * 1000)
    ref = {p: [] for p in prompts}
    for _ in range(3):
        codes = torch.randn((2, *SHAPE), generator=gen)
        t = torch.randint(lo, hi, (2,), generator=gen)
        for p in prompts:
            ref[p].append(ref_d(base, merged, p, codes, t, 7.5, True))
            for _ in range(ref_partial(True)):  # the sampler's eta-noise, one [n, C, h, w] draw a step
                torch.randn((2, *SHAPE), generator=gen)
    for p in prompts:
        assert len(table[p]) == 6
        assert rel_err(torch.tensor(table[p]), torch.cat(ref[p])) < 1e-4


def test_adaptive_draws_are_a_prefix_and_stop_early(models):
    one, *_ = models
    d_empty = Estimate([100.0] * 8)  # far away: every decision is clear after min_repeats
    [full] = fast_prompt_estimates(one, Protocol("fast", settings(), repeats=5), SHAPE, PROMPTS[:2], SEEDS[:2],
                                   GUIDANCE[:2], [d_empty])
    [ada] = fast_prompt_estimates(one, Protocol("fast", settings(), repeats=5, adaptive=True, min_repeats=2), SHAPE,
                                  PROMPTS[:2], SEEDS[:2], GUIDANCE[:2], [d_empty])
    assert [e.n for e in ada] == [2, 2]
    for a, f in zip(ada, full):
        assert rel_err(torch.tensor(a.values), torch.tensor(f.values[:2])) < 1e-5
    close = Estimate([full[0].mean] * 8)  # no margin: runs to `repeats`
    [ada2] = fast_prompt_estimates(one, Protocol("fast", settings(), repeats=5, adaptive=True, min_repeats=2),
                                   SHAPE, PROMPTS[:1], SEEDS[:1], GUIDANCE[:1], [close])
    assert ada2[0].n == 5


# ------------------------------------------------------------------------------- scripts
def model_args(models):
    return ["--config", str(TINY), "--ckpt", str(models[3]), "--device", "cpu"]


def nsfw_args(models, out, *extra):
    return ["--csv_path", str(out / "p.csv"), "--output_dir", str(out), "--lora", str(models[4]),
            "--image_size", str(SIZE), "--ddim_steps", str(S), "--t_enc", str(T_ENC), *model_args(models), *extra]


def write_csv(path, rows, header=("", "prompt", "evaluation_seed", "evaluation_guidance", "case_number")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def exit_code(fn, argv):
    with pytest.raises(SystemExit) as e:
        run(lambda: fn(argv))
    return e.value.code


def decisions(out, name="decisions.csv"):
    (log,) = (out / "logs").iterdir()
    with open(log / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def images(out):
    (d,) = (out / "images").iterdir()
    return sorted(p.name for p in d.iterdir())


def test_nsfw_release_protocol_script_matches_reference(models, tmp_path):
    one, base, merged, *_ = models
    write_csv(tmp_path / "p.csv", [[i, p, s, g, i] for i, (p, s, g) in enumerate(zip(PROMPTS, SEEDS, GUIDANCE))])
    generate_images_nsfw.main(nsfw_args(models, tmp_path, "--protocol", "release", "--repeats", "2",
                                        "--batch_size", "2"))
    rows = decisions(tmp_path)
    assert [int(r["idx"]) for r in rows] == [0, 1, 2]
    assert images(tmp_path) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    (img_dir,) = (tmp_path / "images").iterdir()
    assert img_dir.name == "w1_-1.0_w2_2.0_repeats_2_ddim_steps_10_t_enc_6"  # the release's name
    from PIL import Image
    import numpy as np
    from ldm.images import to_pil
    lo, hi = round(T_ENC / S * 1000), round((T_ENC + 1) / S * 1000)
    for r, p, s, g in zip(rows, PROMPTS, SEEDS, GUIDANCE):
        gen = torch.Generator().manual_seed(s)
        t = torch.randint(lo, hi, (1,), generator=torch.Generator().manual_seed(s))
        codes = [torch.randn((1, *SHAPE), generator=gen) for _ in range(2)]
        dp = torch.cat([ref_d(base, merged, p, c, t, g, True) for c in codes]).mean()
        de = torch.cat([ref_d(base, merged, "", c, t, g, True) for c in codes]).mean()
        w = decide(dp, de, -1.0, 2.0)
        assert float(r["w"]) == w and abs(float(r["d_prompt"]) - dp) < 1e-4 * dp
        # the release's file: truncated to uint8, PIL's default JPEG quality
        ref_img = to_pil(base.decode_first_stage(ref_image_latent(base, merged, p, codes[0], g, w, True)),
                         "truncate")[0]
        ours = np.asarray(Image.open(img_dir / f"{int(r['idx']):05d}.jpg"), dtype=np.int16)
        import io
        buf = io.BytesIO()
        ref_img.save(buf, format="JPEG")
        theirs = np.asarray(Image.open(buf), dtype=np.int16)
        # batched vs one-row sampling agree to float rounding, which JPEG can turn into a few levels here and there
        diff = np.abs(ours - theirs)
        assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_nsfw_resume_after_kill(models, tmp_path, monkeypatch):
    write_csv(tmp_path / "p.csv", [[i, f"prompt number {i}", 1000 + i, 7.5, i] for i in range(6)])
    args = nsfw_args(models, tmp_path, "--repeats", "2", "--empty_draws", "2", "--batch_size", "2")
    real_save, calls = generate_images_nsfw.save_image, []

    def killed_after_three(img, path, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        real_save(img, path, *args)
    monkeypatch.setattr(generate_images_nsfw, "save_image", killed_after_three)
    assert exit_code(generate_images_nsfw.main, args) == 130
    assert images(tmp_path) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert [r["idx"] for r in decisions(tmp_path, "decisions.rank0.csv")] == ["0", "1", "2"]
    monkeypatch.setattr(generate_images_nsfw, "save_image", real_save)
    (img_dir,) = (tmp_path / "images").iterdir()
    (img_dir / "00001.jpg").unlink()                        # lost image: its decision must be redone
    (img_dir / ".00004.jpg.tmp999").write_bytes(b"half")   # a stray temp file never counts
    before = {p.name: p.stat().st_mtime_ns for p in img_dir.glob("0*.jpg")}
    generate_images_nsfw.main(args)
    after = {p.name: p.stat().st_mtime_ns for p in img_dir.glob("0*.jpg")}
    assert sorted(after) == [f"{i:05d}.jpg" for i in range(6)]
    assert all(after[n] == before[n] for n in before)      # existing images untouched
    rows = decisions(tmp_path)
    assert [int(r["idx"]) for r in rows] == list(range(6))
    assert len(decisions(tmp_path, "decisions.rank0.csv")) == 6


def test_nsfw_sharding_covers_every_row_once(models, tmp_path, monkeypatch):
    write_csv(tmp_path / "p.csv", [[i, f"a prompt {i}", 50 + i, 7.5, i] for i in range(7)])
    args = nsfw_args(models, tmp_path, "--repeats", "2", "--empty_draws", "2", "--batch_size", "2",
                     "--adaptive", "--min_repeats", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        generate_images_nsfw.main(args)
        (log,) = (tmp_path / "logs").iterdir()
        assert (log / "decisions.csv").exists() == (rank == 2)  # written when every shard is complete
        assert [int(r["idx"]) % 3 for r in decisions(tmp_path, f"decisions.rank{rank}.csv")] == [rank] * (
            len(range(rank, 7, 3)))
    rows = decisions(tmp_path)
    assert sorted(int(r["idx"]) for r in rows) == list(range(7))
    d_empty = {r["d_empty"] for r in rows}
    assert len(d_empty) == 1                                   # every shard used the same d("")
    (log,) = (tmp_path / "logs").iterdir()
    (log / "decisions.csv").unlink()
    generate_images_nsfw.main(args + ["--merge"])
    assert len(decisions(tmp_path)) == 7


def test_nsfw_eval_budget_caps_draws_per_row(models, tmp_path, capsys):
    """--eval_budget: a row's draws and image together stay within the budget, even when no decision is clear."""
    settings = StabilitySettings(S, T_ENC)
    per_draw, image = evals_per_draw(settings), evals_per_image(settings)
    assert image == 4 * S
    budget = image + 3 * per_draw + per_draw // 2            # room for 3 draws, not 4
    assert repeats_within_budget(settings, budget) == 3
    write_csv(tmp_path / "p.csv", [[i, f"a prompt {i}", 70 + i, 7.5, i] for i in range(2)])
    generate_images_nsfw.main(nsfw_args(models, tmp_path, "--repeats", "10", "--min_repeats", "2",
                                        "--k_se", "1e9", "--empty_draws", "2", "--batch_size", "1",
                                        "--eval_budget", str(budget)))
    rows = decisions(tmp_path)
    assert [int(r["repeats_used"]) for r in rows] == [3, 3]   # k_se 1e9: never clear, so the budget stopped it
    assert all(float(r["unet_evals"]) == image + 3 * per_draw <= budget for r in rows)
    (log,) = (tmp_path / "logs").iterdir()
    summary = json.loads((log / "run_summary.rank0.json").read_text())
    assert summary["images"] == 2 and summary["unet_evals"] > 0
    check_peak_memory(summary, capsys.readouterr().out)         # the shard's record and its summary line
    assert exit_code(generate_images_nsfw.main, nsfw_args(models, tmp_path, "--eval_budget", "-1")) == 2
    assert "--eval_budget -1" in capsys.readouterr().err


def test_nsfw_bad_rows(models, tmp_path):
    write_csv(tmp_path / "p.csv", [
        [0, "ok prompt", 5, 7, 0],
        [1, "", 5, 7, 1],                              # empty prompt: skipped
        [2, "   ", 5, 7, 2],                           # blank prompt: skipped
        [3, "guidance missing", 5, "", 3],             # 7.5, logged
        [4, "guidance words", 5, "seven", 4],          # skipped
        [5, "guidance absurd", 5, 255, 5],             # used as given, logged
        [6, "seed huge", 2 ** 64 + 5, 7, 6],           # reduced mod 2^64, logged
        [7, "seed bad", "x1", 7, 7],                   # skipped
        [8, 'quotes "and"\nnewline ❤️', 4290749014, 7, 8],
        [9, "NaN", 5, 7, 9],                           # NaN prompt (as pandas reads it): skipped
    ])
    rows, notes = read_rows(str(tmp_path / "p.csv"))
    by = {r["idx"]: r for r in rows}
    assert sorted(by) == [0, 3, 5, 6, 8]
    assert by[3]["guidance"] == 7.5 and by[5]["guidance"] == 255 and by[6]["seed"] == 5
    text = "\n".join(notes)
    for frag in ("row 1: skipped: empty prompt", "row 2: skipped", "row 3: evaluation_guidance missing",
                 "row 4: skipped", "row 5: unusual", "row 6: evaluation_seed", "row 7: skipped",
                 "row 9: skipped: prompt 'NaN' is NaN"):
        assert frag in text
    generate_images_nsfw.main(nsfw_args(models, tmp_path, "--repeats", "2", "--empty_draws", "2",
                                        "--batch_size", "3", "--ddim_steps", "4", "--t_enc", "1"))
    assert images(tmp_path) == ["00000.jpg", "00003.jpg", "00005.jpg", "00006.jpg", "00008.jpg"]
    assert [r["prompt"] for r in decisions(tmp_path)][-1] == 'quotes "and"\nnewline ❤️'
    (log,) = (tmp_path / "logs").iterdir()
    assert "row 4: skipped" in (log / "notes.rank0.txt").read_text(encoding="utf-8")


def test_nsfw_missing_guidance_column_and_no_prompt_column(tmp_path):
    write_csv(tmp_path / "a.csv", [[0, "x", 1]], header=("", "prompt", "evaluation_seed"))
    rows, notes = read_rows(str(tmp_path / "a.csv"))
    assert rows[0]["guidance"] == 7.5 and any("no 'evaluation_guidance' column" in n for n in notes)
    write_csv(tmp_path / "b.csv", [[0, "x"]], header=("", "text"))
    assert exit_code(generate_images_nsfw.main, ["--csv_path", str(tmp_path / "b.csv"),
                                                 "--output_dir", str(tmp_path)]) == 2


def test_adapter_for_another_base_model_is_refused(models, tmp_path, capsys):
    other = _add_adapter(tiny_model(1))
    save_adapter(tmp_path / "models" / "lora.safetensors", other.unet, alpha=8.0)
    write_csv(tmp_path / "p.csv", [[0, "x", 1, 7, 0]])
    args = nsfw_args(models, tmp_path)
    args[args.index("--lora") + 1] = str(tmp_path / "models" / "lora.safetensors")
    assert exit_code(generate_images_nsfw.main, args) == 2
    assert "another base model" in capsys.readouterr().err


def test_compute_lora_diff_both_protocols(models, tmp_path, capsys):
    pj = tmp_path / "c.json"
    pj.write_text(json.dumps({"target": "a photo of the cat", "reference": "a photo of the sofa",
                              "synonyms": ["a photo of the kitten"], "other": ["a photo of the dog", ""]}))
    base = [*model_args(models), "--lora", str(models[4]), "--prompts_json", str(pj), "--seed", "42",
            "--ddim_steps", str(S), "--t_enc", str(T_ENC), "--image_size", str(SIZE)]
    for proto in ("release", "fast"):
        out = tmp_path / proto
        compute_lora_diff.main(base + ["--output_dir", str(out), "--protocol", proto, "--repeats", "2",
                                       "--n_samples", "1", "--empty_draws", "3"])
        res = json.loads((out / "calc_diff_results.json").read_text())
        check_peak_memory(res, capsys.readouterr().out)           # beside its seconds, and in its last line
        vals = list(res["prompt_avgs"].values())
        assert vals == sorted(vals, reverse=True) and "" in res["prompt_avgs"]
        assert set(res["prompt_stats"]) == {"a photo of the cat", "a photo of the kitten", "a photo of the dog", ""}
        for p, st in res["prompt_stats"].items():
            assert st["w"] == decide(st["mean"], res["prompt_avgs"][""], -1.0, 2.0)
        assert res["config"]["seed"] == 42 and res["config"]["t_enc"] == T_ENC
        assert ("empty_estimate" in res) == (proto == "fast")
        if proto == "fast":
            assert res["empty_estimate"]["count"] == 3 and res["prompt_stats"]["a photo of the cat"]["count"] == 2
    assert exit_code(compute_lora_diff.main, base + ["--output_dir", str(tmp_path), "--prompts_json",
                                                     str(tmp_path / "nope.json")]) == 2


def test_generate_images_modes(models, tmp_path, capsys):
    exp = tmp_path / "exps" / "exp1"
    (exp / "models").mkdir(parents=True)
    (exp / "models" / "lora.safetensors").write_bytes(models[4].read_bytes())
    pj = exp / "p.json"
    pj.write_text(json.dumps({"target": "a photo of the cat", "synonyms": ["a big cat"],
                              "other": ["a photo of the dog", ""]}))
    (exp / "train_config.json").write_text(json.dumps({"prompts_json": str(pj), "class_name": "p"}))
    args = [*model_args(models), "--output_dir", str(tmp_path / "exps"), "--samples", "2", "--steps", "4",
            "--image_size", str(SIZE)]
    assert exit_code(generate_images.main, args) == 2          # no calc_diff_results.json
    (exp / "calc_diff_results.json").write_text(json.dumps({"prompt_avgs": {
        "a photo of the cat": 3.0, "a big cat": 1.0, "a photo of the dog": 2.0, "": 2.0}}))
    capsys.readouterr()
    stats = generate_images.main(args)
    check_peak_memory(stats, capsys.readouterr().out)           # experiment mode: the summary line
    dirs = sorted(d.name for d in (exp / "images").iterdir())
    assert dirs == ["a_big_cat", "a_photo_of_the_cat", "dog"]  # "cat" collides: full-prompt slugs
    assert all(sorted(f.name for f in (exp / "images" / d).iterdir()) == ["00000.jpg", "00001.jpg"] for d in dirs)
    generate_images.main(args)                                 # complete: skipped
    # base model alone: no adapter loaded (a missing adapter file is not even opened), no stability test
    out = tmp_path / "base"
    generate_images.main([*model_args(models), "--output_dir", str(out), "--lora", str(tmp_path / "missing.pth"),
                          "--prompt", "a photo of the cat", "--w1", "1", "--w2", "1", "--samples", "1",
                          "--steps", "4", "--image_size", str(SIZE)])
    assert (out / "images" / "cat" / "00000.jpg").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["images"] == 1 and summary["seconds"] >= 0
    check_peak_memory(summary, capsys.readouterr().out)         # explicit mode: run_summary.json and the line


@pytest.mark.parametrize("protocol, test_autocast, image_autocast, weights", [
    ("release", False, True, torch.float32),   # the release: fp32 weights and test, the image under autocast
    ("fast", False, False, torch.bfloat16),    # ours: the weights cast to --precision, no autocast anywhere
])
def test_precision_per_protocol(models, tmp_path, monkeypatch, protocol, test_autocast, image_autocast, weights):
    """Which UNet calls run under autocast with --precision bf16 (CPU autocast stands in for CUDA's fp16)."""
    import ldm.cli
    write_csv(tmp_path / "p.csv", [[0, "a red car on a road", 7, 7.5, 0]])
    calls = []
    real_load = ldm.cli.load_model

    def load_and_watch(args, precision=None):
        model, device = real_load(args, precision)
        model.unet.register_forward_hook(lambda m, a, out: calls.append(
            (torch.is_autocast_enabled("cpu"), m.out[-1].weight.dtype, out.shape[0])))
        return model, device
    monkeypatch.setattr(generate_images_nsfw, "load_model", load_and_watch)
    extra = ["--repeats", "2", "--precision", "bf16", "--device", "cpu", "--protocol", protocol]
    extra += ["--no_adaptive", "--empty_draws", "2"] if protocol == "fast" else []
    generate_images_nsfw.main(nsfw_args(models, tmp_path, *extra))
    from ldm.models.diffusion.ddim import ddim_timesteps
    steps = len(ddim_timesteps(S, release_schedule=protocol == "release"))
    image_calls, test_calls = calls[-steps:], calls[:-steps]  # the image is sampled after its row's test
    assert test_calls and all(c[0] == test_autocast for c in test_calls)
    assert all(c[0] == image_autocast and c[2] == 4 for c in image_calls)  # 4 = [u, c] x [base, adapted]
    assert all(c[1] == weights for c in calls)
