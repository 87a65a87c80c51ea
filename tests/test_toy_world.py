"""The toy-digits world: the shipped model, its prompt files and the digit classifier. CPU, offline, seconds."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.evaluation import digits as D
from ldm.loader import load_model_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/toy/digits-inference.yaml"
CKPT = ROOT / "models/toy-digits.safetensors"
PROMPTS = ROOT / "data/digits"


@pytest.fixture(scope="module")
def toy_model():
    # one thread: the model is tiny, and two OpenMP threads on shared (busy) cores slow down many-fold
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model_from_config(CONFIG, CKPT, verbose=False)
    torch.set_num_threads(threads)


def test_shipped_model_loads_strictly(toy_model):
    # load_model_from_config accounts for every key: a missing, unexpected or misshapen tensor raises.
    assert CKPT.stat().st_size <= 20 * 2 ** 20
    assert toy_model.unet.in_channels == 4
    width = toy_model.cond_stage_model.transformer.get_input_embeddings().weight.shape[1]
    attn2 = [m for n, m in toy_model.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and all(m.to_k.in_features == width for m in attn2)
    assert toy_model.latent_shape(16) == (4, 8, 8)
    assert all(p.dtype == torch.float32 for p in toy_model.parameters())


def test_prompt_files_name_trained_phrasings():
    from scripts.tools import train_toy_model as train
    captions = set(train.all_captions()[0])
    for d, name in enumerate(D.WORDS):
        data = json.loads((PROMPTS / f"{name}.json").read_text())
        assert set(data) == {"target", "reference", "synonyms", "other"}
        assert D.digit_of_text(data["target"]) == d
        assert len(data["synonyms"]) == 3 and all(D.digit_of_text(s) == d for s in data["synonyms"])
        assert sorted(D.digit_of_text(o) for o in data["other"] if o) == [o for o in range(10) if o != d]
        assert "" in data["other"]
        assert data["reference"] in captions
        assert {data["target"], *data["synonyms"], *data["other"]} <= captions


def test_classifier_heldout_accuracy():
    acc = D.heldout_accuracy()
    print(f"digit classifier held-out accuracy: {acc:.4f}")
    assert acc > 0.9


def test_classifier_reads_pictures_like_the_models(tmp_path):
    feats, labels = D.real_digits_features()
    grey = (feats.reshape(-1, 8, 8) * (255 / 16)).round().astype(np.uint8)
    pics = [Image.fromarray(g).resize((16, 16), Image.BILINEAR).convert("RGB") for g in grey[:200]]
    assert (D.classify_images(pics) == labels[:200]).mean() > 0.95
    # a generate_images.py tree: per-folder rates of the folder's own digit
    for d in (3, 7):
        folder = tmp_path / f"a_photo_of_the_digit_{D.WORDS[d]}"
        folder.mkdir()
        for i, idx in enumerate(np.flatnonzero(labels[:300] == d)[:5]):
            Image.fromarray(grey[idx]).resize((32, 32), Image.BILINEAR).save(folder / f"{i:05d}.png")
    res = D.digit_rates(tmp_path)
    assert res["all"]["n"] == 10
    assert res["folders"]["a_photo_of_the_digit_three"]["digit"] == 3
    assert res["folders"]["a_photo_of_the_digit_three"]["rate"] >= 0.8
    assert res["folders"]["a_photo_of_the_digit_seven"]["rate"] >= 0.8


def test_reduced_quality_bar(toy_model):
    # 10 images for 3 digits with 20 DDIM steps, CFG 7.5: most images must show the prompted digit.
    prompts = [json.loads((PROMPTS / f"{n}.json").read_text())["target"] for n in ("three", "seven", "eight")]
    res = D.generation_rates(toy_model, prompts, list(range(10)), steps=20, scale=7.5)
    rates = {p: r["rate"] for p, r in res.items()}
    print(rates)
    assert all(r >= 0.8 for r in rates.values()), rates


def test_judge_reads_junk_as_unsure_and_real_digits_as_sure():
    """The 'nothing digit-like' outcome: blank, grey and noise images are unsure; real held-out digits are sure."""
    from sklearn.model_selection import train_test_split
    junk = [Image.fromarray(np.zeros((16, 16), np.uint8)), Image.fromarray(np.full((16, 16), 128, np.uint8)),
            Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8))]
    _, sure = D.classify_with_confidence(junk)
    assert not sure.any()
    x, y = D.real_digits_features()
    _, xb, _, yb = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    grey = (xb.reshape(-1, 8, 8) * (255 / 16)).round().astype(np.uint8).repeat(2, 1).repeat(2, 2)
    preds, sure = D.classify_with_confidence(list(grey))
    assert sure.mean() >= 0.99 and (preds == yb).mean() > 0.95


def test_digit_rates_report_confusion_and_unsure(tmp_path):
    (tmp_path / "blank").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "blank" / f"{i:05d}.png")
    res = D.digit_rates(tmp_path)
    f = res["folders"]["blank"]
    assert f["n"] == 3 and f["unsure_rate"] == 1.0 and sum(f["sure_rates"]) == 0.0
    assert abs(sum(f["rates"]) - 1.0) < 1e-9 and len(res["unsure"]) == 3


def test_preservation_templates_fill_in_the_other_digits_and_run_names_do_not_see_the_checkout(monkeypatch, tmp_path):
    """The toy benchmarks' preserved prompts: each template with the nine other digits ({n} numeral, {w} word);
    the default is the sweep's "a handwritten N"; a template naming no digit is one line. The run folder's hash
    sees the prompts JSON relative to the repository, so another checkout of the same commit reuses the runs."""
    import argparse

    from ldm.errors import UserError
    from ldm.evaluation import toy_benchmark as tb
    six = PROMPTS / "six.json"
    assert tb.preserve_prompts(six) == [f"a handwritten {d}" for d in (0, 1, 2, 3, 4, 5, 7, 8, 9)]
    both = tb.preserve_prompts(six, ["a handwritten {n}", "a photo of the digit {w}"])
    assert len(both) == 18 and both[9:] == [f"a photo of the digit {w}" for w in D.WORDS if w != "six"]
    with pytest.raises(UserError, match="'a photo of a digit': names no digit"):
        tb.preserve_prompts(six, ["a photo of a digit"])
    p = argparse.ArgumentParser()
    tb.add_toy_args(p)
    args = p.parse_args([])
    _, lora = tb.train_argv(args, tb.prompts_file("six"), tmp_path, 1)
    other = tmp_path / "other_checkout" / "data" / "digits" / "six.json"
    other.parent.mkdir(parents=True)
    other.write_text(six.read_text())
    monkeypatch.setattr(tb, "ROOT", tmp_path / "other_checkout")
    moved = tb.train_argv(args, other, tmp_path, 1)[1]
    assert moved == lora
    wider = p.parse_args(["--preserve_templates", "a handwritten {n}", "a photo of the digit {w}"])
    assert tb.train_argv(wider, tb.prompts_file("six"), tmp_path, 1)[1] != lora  # other settings, other run
    empty = p.parse_args(["--preserve_extra", ""])
    argv, with_empty = tb.train_argv(empty, tb.prompts_file("six"), tmp_path, 1)
    preserved = argv[argv.index("--preserve") + 1:argv.index("--preserve_weight")]
    assert preserved == [f"a handwritten {d}" for d in range(10) if d != 6] + [""] and with_empty != lora
