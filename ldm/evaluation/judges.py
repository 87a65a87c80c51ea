"""The object judges of the benchmark: what each image of a prompt folder is read as.

    digits   the toy world's digit classifier (ldm/evaluation/digits.py): labels "0".."9", and the share it reads
             as no digit at all ("unsure")
    clip     CLIP zero-shot over the concept's class prompts ([target] + other, "" left out; the UnGuide paper's
             protocol with a ViT-B/32 folder), from a LOCAL CLIP folder; also the CLIP score of each image against
             its own prompt (100 * max(cos, 0))

judge_prompts -> {prompt: {"n": images, "counts": {label: images}, "unsure": share or None,
"clip_score": mean or None}}; intended_label(judge, concept) -> label_of(prompt): the label an image of that prompt
gets when drawn as asked (target and synonyms: the concept's; other prompts: their own).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ldm.evaluation.common import UserError, decode_image, list_images


def _images(folder: Path) -> list:
    out = []
    for p in list_images(folder):
        rgb, err = decode_image(p)
        if rgb is not None:
            out.append(rgb)
    if not out:
        raise UserError(f"{folder}: no readable image")
    return out


@lru_cache(maxsize=2)
def _clip(model_dir: str):
    from ldm.evaluation.clip_score import load_clip
    return load_clip(model_dir)


def judge_prompts(judge: dict, concept, where: dict[str, Path]) -> dict[str, dict]:
    """Judge every prompt's image folder (where: {prompt: folder})."""
    out = {}
    if judge["kind"] == "digits":
        from ldm.evaluation.digits import classify_with_confidence
        for p, folder in where.items():
            preds, sure = classify_with_confidence(_images(folder))
            counts: dict[str, int] = {}
            for d in preds.tolist():
                counts[str(d)] = counts.get(str(d), 0) + 1
            out[p] = {"n": len(preds), "counts": counts, "unsure": float(1 - sure.mean()), "clip_score": None}
        return out
    if judge["kind"] == "clip":
        from PIL import Image

        from ldm.evaluation.clip_score import clip_scores, cosine_matrix, embed_images, embed_texts, zero_shot_classes
        model, processor = _clip(judge["clip_model"])
        classes = zero_shot_classes(concept.data)
        class_emb = embed_texts(model, processor, classes)
        for p, folder in where.items():
            images = [Image.fromarray(a) for a in _images(folder)]
            counts, scores = {}, []
            for i in range(0, len(images), 16):
                emb = embed_images(model, processor, images[i:i + 16])
                for k in cosine_matrix(emb, class_emb).argmax(-1).tolist():
                    counts[classes[k]] = counts.get(classes[k], 0) + 1
                scores += clip_scores(emb, embed_texts(model, processor, [p] * len(emb))).tolist()
            out[p] = {"n": len(images), "counts": counts, "unsure": None, "clip_score": sum(scores) / len(scores)}
        return out
    raise UserError(f"unknown judge {judge['kind']!r}")


def clip_scores_of(clip_model: str, items: list[tuple[Path, str]], batch: int = 16) -> list[float]:
    """CLIP score (100 * max(cos(image, prompt), 0)) of each (image file, its own prompt) pair, from a local CLIP
    folder; unreadable files are left out."""
    from PIL import Image

    from ldm.evaluation.clip_score import clip_scores, embed_images, embed_texts
    model, processor = _clip(clip_model)
    out: list[float] = []
    for i in range(0, len(items), batch):  # decoded a batch at a time (thousands of 512 px images)
        chunk = [(a, t) for a, t in ((decode_image(p)[0], t) for p, t in items[i:i + batch]) if a is not None]
        if chunk:
            emb = embed_images(model, processor, [Image.fromarray(a) for a, _ in chunk])
            out += clip_scores(emb, embed_texts(model, processor, [t for _, t in chunk])).tolist()
    if not out:
        raise UserError(f"no readable image to score ({len(items)} files)")
    return out


def intended_label(judge: dict, concept):
    """label_of(prompt) for the object table (see the module docstring)."""
    groups = concept.groups()
    erased = set(groups["target"]) | set(groups["synonyms"])
    if judge["kind"] == "digits":
        from ldm.evaluation.digits import digit_of_text
        target = digit_of_text(concept.data["target"])
        if target is None:
            raise UserError(f"{concept.prompts_json}: the digits judge needs a target naming one digit")
        return lambda p: target if p in erased else digit_of_text(p)
    return lambda p: concept.data["target"] if p in erased else p


def judge_protocol(judge: dict) -> str:
    """One line naming the judge and its version, for the protocol under a table."""
    if judge["kind"] == "digits":
        import sklearn

        from ldm.evaluation.digits import SVC_C, SVC_GAMMA, UNSURE_FACTOR
        return (f"judge: the toy world's digit classifier (RBF SVM, C {SVC_C}, gamma {SVC_GAMMA}, fitted on "
                f"scikit-learn {sklearn.__version__}'s 1,797 real digits; 'unsure' beyond {UNSURE_FACTOR}x the 99th "
                "percentile of real digits' distance)")
    import transformers
    return (f"judge: CLIP zero-shot over [target] + other prompts of each concept, local model "
            f"{Path(judge['clip_model']).name} (transformers {transformers.__version__})")
