"""
CLIP score and zero-shot accuracy (`compute_metrics.py -m clip`).

Model: a CLIP model in a LOCAL folder (`--clip_model PATH`), loaded with
transformers `CLIPModel.from_pretrained(PATH, local_files_only=True)` and
`CLIPProcessor.from_pretrained(PATH, local_files_only=True)`. Nothing is
downloaded; a missing or incomplete folder is a user error.

CLIP score of an image against its prompt: 100 * max(cos(image_emb, text_emb), 0)
(the usual CLIPScore definition with w = 100, no 2.5 rescaling).

Image -> prompt mapping (assumption, kept deliberately modest):
- tree layout written by generate_images.py: `images/<class>/<idx:05d>.jpg`.
  `<class>` is the folder name; it is matched against the prompts of the
  prompts JSON (`--prompts_json`, `{"target": ..., "reference": ...,
  "synonyms": [...], "other": [...]}`): a folder matches a prompt if its name
  equals the prompt, its slug (lowercase, runs of non-alphanumerics -> "_"),
  or its role key ("target", "reference"). A folder that matches no prompt
  is a user error naming it.
- flat I2P layout `<case:05d>.jpg` with `--csv_path`: the prompt is the I2P
  row's prompt (join by case number); such images have no zero-shot label.

Zero-shot accuracy: the classes are [target] + other ("" excluded). An image
whose prompt is one of the classes is labelled with it; the prediction is the
class text with the highest cosine similarity. We report the accuracy over
labelled images and the share of all labelled images predicted as the target
(for an erased target, lower is better on target images).

Outputs: clip_scores.csv (per image), clip_summary.csv (key,value), clip_summary.md.
The pass is recomputed each time (no resume: it is cheap compared to NudeNet).
"""

import re
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldm.prompts import read_prompts_json
from ldm.evaluation.common import (
    UserError, atomic_write_text, case_number_from_name, csv_text, decode_image, image_key,
    list_images, load_i2p_csv, markdown_table, write_summary_csv,
)

# -----------------------------------------------------------------------------
# prompts


def zero_shot_classes(prompts):
    """[target] + other, with "" excluded and duplicates dropped (order kept)."""
    out = []
    for p in [prompts["target"]] + list(prompts.get("other") or []):
        if p and p not in out:
            out.append(p)
    return out


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def folder_prompt_names(prompts):
    """Folder name -> prompt, for every prompt of a prompts JSON."""
    names = {}
    roles = [("target", prompts.get("target")), ("reference", prompts.get("reference"))]
    roles += [(None, p) for key in ("synonyms", "other") for p in (prompts.get(key) or [])]
    for role, p in roles:
        if not p:
            continue
        names.setdefault(p, p)
        names.setdefault(slug(p), p)
        if role:
            names.setdefault(role, p)
    return names


def map_prompts(images_dir, paths, prompts=None, i2p=None):
    """Prompt of each image (list aligned with `paths`); see module docstring."""
    images_dir = Path(images_dir)
    names = folder_prompt_names(prompts) if prompts else {}
    out = []
    for p in paths:
        rel = Path(image_key(p, images_dir))
        if len(rel.parts) > 1 and prompts:
            folder = rel.parts[0]
            if folder not in names:
                raise UserError(f"image folder '{folder}' in {images_dir} matches no prompt of --prompts_json")
            out.append(names[folder])
        elif i2p is not None:
            case = case_number_from_name(rel.name)
            if case is None or case not in i2p.index:
                raise UserError(f"image {rel} has no I2P case number in --csv_path")
            prompt = i2p.loc[case, "prompt"]
            out.append(prompt if isinstance(prompt, str) else "")
        else:
            raise UserError(f"no prompt for image {rel}: use the <class>/<idx>.jpg layout with "
                            "--prompts_json, or <case>.jpg with --csv_path")
    return out


# -----------------------------------------------------------------------------
# model


def check_clip_dir(model_dir):
    """Cheap check, before any work, that --clip_model names a model folder."""
    if not model_dir:
        raise UserError("-m clip needs --clip_model PATH, a local folder with a CLIP model "
                        "(saved with save_pretrained); none given")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"--clip_model {model_dir} does not exist (a local CLIP model folder is needed)")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--clip_model {model_dir} has no CLIP model (no config.json there)")
    return model_dir


def load_clip(model_dir):
    """(model, processor) from a local folder, or UserError."""
    model_dir = check_clip_dir(model_dir)
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--clip_model {model_dir} could not be loaded as a CLIP model: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return model.eval(), processor


def _features(out):
    """transformers 4 returns a tensor, transformers 5 a model output whose
    pooler_output holds the projected embedding."""
    return out if hasattr(out, "norm") else out.pooler_output


def embed_texts(model, processor, texts):
    import torch
    batch = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        return _features(model.get_text_features(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]))


def embed_images(model, processor, images):
    import torch
    batch = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        return _features(model.get_image_features(pixel_values=batch["pixel_values"]))


# -----------------------------------------------------------------------------
# arithmetic (pure)


def cosine_matrix(a, b):
    """Cosine similarity of every row of a against every row of b."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


def clip_scores(image_embeds, text_embeds):
    """Row-wise CLIP score: 100 * max(cos(image_i, text_i), 0)."""
    a = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    b = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return 100.0 * (a * b).sum(-1).clamp(min=0)


def summarize(rows, classes):
    """rows: dicts with clip_score, label (class or None), pred (class or None)."""
    n = len(rows)
    labelled = [r for r in rows if r["label"] is not None]
    correct = sum(r["pred"] == r["label"] for r in labelled)
    items = [("metric", "clip"), ("images_evaluated", n),
             ("clip_score_mean", round(sum(r["clip_score"] for r in rows) / n, 4) if n else ""),
             ("zero_shot_classes", " | ".join(classes)), ("zero_shot_images", len(labelled)),
             ("zero_shot_accuracy", round(correct / len(labelled), 4) if labelled else ""),
             ("predicted_as_target", round(sum(r["pred"] == classes[0] for r in labelled) / len(labelled), 4)
              if labelled and classes else "")]
    for c in classes:
        rs = [r for r in labelled if r["label"] == c]
        if rs:
            items.append((f"accuracy[{c}]", round(sum(r["pred"] == c for r in rs) / len(rs), 4)))
    return items


# -----------------------------------------------------------------------------
# pipeline


def evaluate(images_dir, output_dir=None, clip_model=None, prompts_json=None, csv_path=None,
             batch_size=16, progress=True, model_and_processor=None):
    images_dir = Path(images_dir)
    paths = list_images(images_dir)
    if model_and_processor is None:
        check_clip_dir(clip_model)
    prompts = read_prompts_json(prompts_json) if prompts_json else None
    i2p = load_i2p_csv(csv_path) if csv_path else None
    texts = map_prompts(images_dir, paths, prompts, i2p)
    model, processor = model_and_processor or load_clip(clip_model)
    classes = zero_shot_classes(prompts) if prompts else []
    class_emb = embed_texts(model, processor, classes) if classes else None

    rows, skipped = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="clip", unit="batch", disable=not progress):
        batch, batch_texts = [], []
        for p, t in zip(paths[i:i + batch_size], texts[i:i + batch_size]):
            rgb, err = decode_image(p)
            if err is not None:
                skipped.append(image_key(p, images_dir))
                continue
            batch.append((p, Image.fromarray(rgb)))
            batch_texts.append(t)
        if not batch:
            continue
        img_emb = embed_images(model, processor, [im for _, im in batch])
        scores = clip_scores(img_emb, embed_texts(model, processor, batch_texts))
        preds = cosine_matrix(img_emb, class_emb).argmax(-1).tolist() if classes else [None] * len(batch)
        for (p, _), t, s, k in zip(batch, batch_texts, scores.tolist(), preds):
            rows.append({"image": image_key(p, images_dir), "prompt": t, "clip_score": s,
                         "label": t if t in classes else None,
                         "pred": classes[k] if k is not None else None})

    out_dir = Path(output_dir) if output_dir else images_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    items = summarize(rows, classes) + [("images_skipped", len(skipped)),
                                        ("skipped_images", ";".join(skipped)),
                                        ("clip_model", str(clip_model or "")),
                                        ("images_dir", str(images_dir.resolve()))]
    atomic_write_text(out_dir / "clip_scores.csv", csv_text(
        ["image", "prompt", "clip_score", "label", "pred"],
        [(r["image"], r["prompt"], round(r["clip_score"], 4), r["label"] or "", r["pred"] or "") for r in rows]))
    write_summary_csv(out_dir / "clip_summary.csv", items)
    atomic_write_text(out_dir / "clip_summary.md", "# CLIP summary\n\n"
                      "CLIP score = 100 * max(cos, 0); zero-shot over [target] + other.\n\n"
                      + markdown_table(["key", "value"], items))
    return dict(items), [out_dir / n for n in ("clip_scores.csv", "clip_summary.csv", "clip_summary.md")]


def run(args):
    """Entry point of the metric registry."""
    summary, written = evaluate(args.images, args.output_dir, args.clip_model,
                                args.prompts_json, args.csv_path)
    print(f"clip: mean CLIP score {summary['clip_score_mean']}, "
          f"zero-shot accuracy {summary['zero_shot_accuracy'] or 'n/a'} over {summary['images_evaluated']} images")
    return written
