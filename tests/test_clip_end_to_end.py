"""The CLIP judge and CLIP score, end to end from a local CLIP folder, against transformers computed directly.

The folder: a tiny random CLIPModel (transformers' CLIPConfig) with a CLIPProcessor whose tokenizer is CLIP's own
BPE (the files the repository ships in ldm/modules/encoders/clip_tokenizer/), written with save_pretrained. The
code paths: the benchmark's judge (ldm/evaluation/judges.py: zero-shot counts and the CLIP score per prompt), the
attacks' judge (ldm/attacks/judges.py) and compute_metrics.py -m clip (ldm/evaluation/clip_score.py), all
reading the folder as a user's. The reference: CLIPModel.forward on the processor's joint batch (its normalised
image_embeds and text_embeds, and logits_per_image / logit_scale), which is not the get_*_features path the
project uses: CLIP score = 100 * max(cos(image, its prompt), 0), the judge's class = argmax over the class prompts.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_model import save_tiny_clip
from ldm.evaluation.benchmark import Concept
from ldm.modules.encoders.modules import BOS_ID, EOS_ID, TOKENIZER_DIR

PROMPTS = {"target": "a photo of a cat", "synonyms": ["a photo of a kitten"],
           "other": ["a photo of a dog", "a photo of a truck", ""]}
CLASSES = ["a photo of a cat", "a photo of a dog", "a photo of a truck"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPTokenizer
    folder = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    assert tok("a photo of a cat").input_ids[0] == BOS_ID and len(tok) == 49408  # the real BPE vocabulary
    torch.manual_seed(1)  # a draw whose cosines take both signs and whose argmax varies (asserted below)
    return save_tiny_clip(folder, tok, 49408, BOS_ID, EOS_ID, width=32, layers=2, projection=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three prompt folders of four images each (<prompt>/<idx>.png, as generate_images.py lays them out)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    where = {}
    for k, p in enumerate(["a photo of a cat", "a photo of a kitten", "a photo of a dog"]):
        folder = root / p.replace(" ", "_")
        folder.mkdir()
        for i in range(4):
            base = rng.uniform(0, 255, 3) * (k + 1) / 3
            a = (base + rng.normal(0, 60, (48, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(folder / f"{i:05d}.png")
        where[p] = folder
    return where


def direct(clip_dir: Path, folder: Path, texts: list[str]) -> torch.Tensor:
    """cos(image, text) [images, texts] by CLIPModel.forward, from the folder, images in file order."""
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    ims = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    batch = proc(text=texts, images=ims, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
    cos = out.image_embeds @ out.text_embeds.T  # both normalised by CLIPModel.forward
    assert torch.allclose(cos, out.logits_per_image / model.logit_scale.exp(), atol=1e-6)
    return cos


def test_benchmark_judge_counts_and_clip_score(clip_dir, images, tmp_path):
    from ldm.evaluation.judges import judge_prompts
    concept = Concept("cat", tmp_path / "cat.json", PROMPTS, [])
    got = judge_prompts({"kind": "clip", "clip_model": str(clip_dir)}, concept, images)
    all_scores, classes = [], set()
    for p, folder in images.items():
        cos = direct(clip_dir, folder, CLASSES + [p])
        want_counts: dict[str, int] = {}
        for k in cos[:, :len(CLASSES)].argmax(1).tolist():
            want_counts[CLASSES[k]] = want_counts.get(CLASSES[k], 0) + 1
        scores = 100 * cos[:, -1].clamp(min=0)
        all_scores += scores.tolist()
        assert got[p]["n"] == 4 and got[p]["counts"] == want_counts, (p, got[p], want_counts)
        classes |= set(want_counts)
        assert got[p]["clip_score"] == pytest.approx(scores.mean().item(), abs=1e-4)
    print("judge:", {p: (v["counts"], round(v["clip_score"], 4)) for p, v in got.items()})
    # the draw tells things apart: some cosines clamped to 0, others not; more than one class predicted
    assert min(all_scores) == 0 and max(all_scores) > 5 and len(classes) >= 2


def test_attack_judge_is_the_argmax_over_target_and_others(clip_dir, images):
    from ldm.attacks.judges import clip_judge
    classes = ["a photo of a dog", "a photo of a cat", "a photo of a truck"]  # the target first, as attack.py has it
    judge = clip_judge(str(clip_dir), classes[0], classes[1:] + ["", classes[0]])
    assert judge.protocol["classes"] == classes  # "" and the target itself left out of the others
    verdicts = []
    for folder in images.values():
        ims = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
        want = (direct(clip_dir, folder, classes).argmax(1) == 0).tolist()
        assert judge(ims) == want
        verdicts += want
    print("attack judge verdicts:", verdicts)
    assert set(verdicts) == {True, False}


def test_compute_metrics_clip_scores_per_image(clip_dir, images, tmp_path):
    from ldm.evaluation.clip_score import evaluate
    (tmp_path / "p.json").write_text(json.dumps(PROMPTS))
    root = next(iter(images.values())).parent
    summary, _ = evaluate(root, tmp_path / "out", str(clip_dir), tmp_path / "p.json", progress=False)
    rows = {r["image"]: r for r in csv.DictReader((tmp_path / "out" / "clip_scores.csv").open())}
    assert len(rows) == 12
    for p, folder in images.items():
        cos = direct(clip_dir, folder, CLASSES + [p])
        for i, f in enumerate(sorted(folder.glob("*.png"))):
            r = rows[f"{folder.name}/{f.name}"]
            assert r["prompt"] == p
            assert float(r["clip_score"]) == pytest.approx(100 * max(cos[i, -1].item(), 0), abs=1e-3)  # CSV: 4 dp
            assert r["pred"] == CLASSES[int(cos[i, :len(CLASSES)].argmax())]
    assert summary["zero_shot_classes"] == " | ".join(CLASSES)
