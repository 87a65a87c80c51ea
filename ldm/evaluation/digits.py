"""
Digit classifier for the toy-digits world (`compute_metrics.py -m digits`).

The classifier is an RBF support-vector machine fitted, deterministically and in well under a second, on
scikit-learn's 1,797 real 8x8 digits (`sklearn.datasets.load_digits`, shipped with the package). Nothing is
cached on disk: `get_classifier()` fits it once per process.

Images go to the digits' own format before classification: greyscale, resized to 16x16 (the toy model's
size; other sizes are resampled with PIL's box filter), block-averaged to 8x8 and scaled to 0..16 (ink
bright on a dark background, as the toy model draws them). The real digits are fitted in the same form they
have after the toy model's pipeline (bilinear 8 -> 16 upsampling, then this preprocessing), so training and
generated images share one format.

Functions:
- classify_images(images) -> np.ndarray of digits, one per PIL image.
- digit_scores(images) -> [N, 10] one-vs-rest decision values (a graded judge).
- digit_rates(folder) -> rates of each digit over all images of a folder (recursive), and per subfolder
  for the generate_images.py tree `images/<class>/<idx:05d>.jpg`.
- heldout_accuracy() -> accuracy of the same recipe fitted on 70% of the real digits, scored on the rest.
- generation_rates(model, prompts, seeds, ...) -> per-prompt rate of the intended digit (the quality bar).
- run(args): the metric-registry entry; writes digits_rates.csv (one row per subfolder, or "all"),
  digits_summary.csv (key,value) and digits_summary.md.
"""

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.evaluation.common import (
    UserError, atomic_write_text, csv_text, decode_image, image_key, list_images, markdown_table,
    write_summary_csv,
)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOY_SIZE = 16   # side of the toy model's images
SVC_C, SVC_GAMMA = 10.0, 0.001
# Unsure ("nothing digit-like"): farther from every real digit of the predicted class than UNSURE_FACTOR x the 99th
# percentile of real held-out digits' distances (19.4 -> 29.0). Measured: the toy model's own digits (base model,
# ten prompts x 20 seeds) lie at median 15.6, 99th percentile 25.3, max 28.7; blank, grey and noise images at 41-50.
UNSURE_QUANTILE, UNSURE_FACTOR = 0.99, 1.5


# -----------------------------------------------------------------------------
# preprocessing and fitting

def _to_8x8(grey: np.ndarray) -> np.ndarray:
    """[N, 16, 16] greyscale in 0..255 -> [N, 64] in 0..16 (2x2 block means)."""
    n = grey.shape[0]
    small = grey.reshape(n, 8, 2, 8, 2).mean(axis=(2, 4))
    return (small * (16.0 / 255.0)).reshape(n, 64)


def images_to_features(images) -> np.ndarray:
    """PIL images (any mode, any size) or HxW(x3) uint8 arrays -> [N, 64] features in the digits' format."""
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im)
        im = im.convert("L")
        if im.size != (TOY_SIZE, TOY_SIZE):
            im = im.resize((TOY_SIZE, TOY_SIZE), Image.BOX)
        out.append(np.asarray(im, dtype=np.float64))
    if not out:
        return np.zeros((0, 64))
    return _to_8x8(np.stack(out))


def real_digits_features() -> tuple[np.ndarray, np.ndarray]:
    """The real digits in the form generated images take: bilinear 8 -> 16 as in training, then 16 -> 8."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    x = F.interpolate(x, size=(TOY_SIZE, TOY_SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)
    grey = ((x[:, 0] + 1) * 127.5).round().numpy()   # what to_pil writes
    return _to_8x8(grey), np.asarray(data.target)


def fit_classifier(features: np.ndarray, labels: np.ndarray):
    from sklearn.svm import SVC
    return SVC(C=SVC_C, gamma=SVC_GAMMA).fit(features, labels)


@lru_cache(maxsize=1)
def get_classifier():
    """The classifier fitted on all 1,797 real digits (once per process)."""
    x, y = real_digits_features()
    return fit_classifier(x, y)


def heldout_accuracy(test_size: float = 0.3, seed: int = 0) -> float:
    """Fit the same recipe on a stratified (1 - test_size) share of the real digits, score the rest."""
    from sklearn.model_selection import train_test_split
    x, y = real_digits_features()
    xa, xb, ya, yb = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return float((fit_classifier(xa, ya).predict(xb) == yb).mean())


def classify_images(images) -> np.ndarray:
    """list of PIL images -> np.ndarray [N] of predicted digits (int)."""
    return classify_with_confidence(images)[0]


def _class_distances(train_x: np.ndarray, train_y: np.ndarray, feats: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """[N] distance of each feature vector to its nearest real digit of the predicted class (0..16 pixel scale)."""
    out = np.empty(len(feats))
    for c in np.unique(preds):
        idx = preds == c
        ref = train_x[train_y == c]                                   # [M, 64]
        d2 = ((feats[idx, None, :] - ref[None, :, :]) ** 2).sum(-1)   # [n, M]
        out[idx] = np.sqrt(d2.min(axis=1))
    return out


@lru_cache(maxsize=1)
def unsure_distance(quantile: float = UNSURE_QUANTILE) -> float:
    """The distance to the nearest real digit of the predicted class above which an image counts as unsure:
    UNSURE_FACTOR x the `quantile` of real held-out digits' distances (fit on 70%, measured on 30%)."""
    from sklearn.model_selection import train_test_split
    x, y = real_digits_features()
    xa, xb, ya, _ = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    preds = fit_classifier(xa, ya).predict(xb)
    return UNSURE_FACTOR * float(np.quantile(_class_distances(xa, ya, xb, preds), quantile))


def classify_with_confidence(images) -> tuple[np.ndarray, np.ndarray]:
    """list of PIL images -> (predicted digits [N] int, sure [N] bool). An unsure image lies far from every real
    digit of the class it is read as (unsure_distance): what an erasure that leaves nothing digit-like produces
    (the 10-way prediction alone always names some digit)."""
    feats = images_to_features(images)
    if feats.shape[0] == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=bool)
    preds = get_classifier().predict(feats).astype(int)
    x, y = real_digits_features()
    return preds, _class_distances(x, y, feats, preds) <= unsure_distance()


def digit_scores(images) -> np.ndarray:
    """list of PIL images -> [N, 10] the classifier's one-vs-rest decision values (higher: more like that digit).
    A graded judge: it still moves when the predicted digit does not (e.g. how strongly an image is a three)."""
    feats = images_to_features(images)
    if feats.shape[0] == 0:
        return np.zeros((0, 10))
    return np.asarray(get_classifier().decision_function(feats), dtype=float)


# -----------------------------------------------------------------------------
# prompts -> intended digit

_NUMERAL = re.compile(r"(?<![0-9a-z])([0-9])(?![0-9a-z])")


def digit_of_text(text: str) -> int | None:
    """The one digit a prompt or folder name names ("a photo of the digit three", "the_number_3"), or None
    when it names none or several."""
    words = re.findall(r"[a-z]+", text.lower())
    found = {WORDS.index(w) for w in words if w in WORDS}
    found |= {int(m) for m in _NUMERAL.findall(text.lower().replace("_", " "))}
    return found.pop() if len(found) == 1 else None


def _folder_digit(folder: str, prompts: dict | None) -> int | None:
    d = digit_of_text(folder)
    if d is None and prompts:
        from ldm.evaluation.clip_score import folder_prompt_names
        prompt = folder_prompt_names(prompts).get(folder)
        d = digit_of_text(prompt) if prompt else None
    return d


# -----------------------------------------------------------------------------
# folders of images

def rates_of(preds: np.ndarray) -> list[float]:
    """Share of each digit 0..9 among predictions."""
    n = max(len(preds), 1)
    return [float((preds == d).sum()) / n for d in range(10)]


def digit_rates(folder, prompts: dict | None = None) -> dict:
    """Classify every image under `folder` (recursive).

    Returns {"all": {"n", "rates", "unsure_rate"}, "folders": {name: {"n", "rates", "digit", "rate", "unsure_rate",
    "sure_rates"}}, "unreadable": [...], "predictions": {image key: digit}, "unsure": [image keys]}. `rates` is
    the share of each digit 0..9 (the full confusion row: what a folder's images became); for a subfolder whose
    name (or, with `prompts`, whose prompt) names one digit, `digit` is that digit and `rate` its share;
    `unsure_rate` the share the classifier reads as no clear digit (classify_with_confidence) and `sure_rates`
    the digits' shares among the sure ones (sum + unsure_rate = 1). Images directly in `folder` count in "all".
    """
    folder = Path(folder)
    paths = list_images(folder)
    keys, images, unreadable = [], [], []
    for p in paths:
        rgb, err = decode_image(p)
        if rgb is None:
            unreadable.append(f"{image_key(p, folder)}: {err}")
            continue
        keys.append(image_key(p, folder))
        images.append(rgb)
    if not images:
        raise UserError(f"images folder {folder}: no readable image ({unreadable[0]})")
    preds, sure = classify_with_confidence(images)
    out = {"all": {"n": len(preds), "rates": rates_of(preds), "unsure_rate": float(1 - sure.mean())},
           "folders": {}, "unreadable": unreadable, "predictions": dict(zip(keys, preds.tolist())),
           "unsure": [k for k, s_ in zip(keys, sure) if not s_]}
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        parts = k.split("/")
        if len(parts) > 1:
            groups.setdefault(parts[0], []).append(i)
    for name, idx in sorted(groups.items()):
        prs, sr = preds[idx], sure[idx]
        d = _folder_digit(name, prompts)
        rates = rates_of(prs)
        out["folders"][name] = {"n": len(prs), "rates": rates, "digit": d, "rate": None if d is None else rates[d],
                                "unsure_rate": float(1 - sr.mean()),
                                "sure_rates": [float(((prs == c) & sr).sum()) / len(prs) for c in range(10)]}
    return out


# -----------------------------------------------------------------------------
# generation (the quality bar of the toy model)

def generation_rates(model, prompts: list[str], seeds: list[int], steps: int = 50, scale: float = 7.5,
                     image_size: int = TOY_SIZE, batch_size: int = 50) -> dict[str, dict]:
    """For each prompt: one image per seed (txt2img, DDIM, CFG), classified.

    Returns {prompt: {"digit": intended digit or None, "rate": share classified as it (None if no digit),
    "rates": share of each digit, "images": the PIL images}}.
    """
    from ldm.sampling import txt2img
    out = {}
    for prompt in prompts:
        images = []
        for i in range(0, len(seeds), batch_size):
            chunk = list(seeds[i:i + batch_size])
            images += txt2img(model, [prompt] * len(chunk), chunk, image_size=image_size, steps=steps, scale=scale)
        preds = classify_images(images)
        d = digit_of_text(prompt)
        rates = rates_of(preds)
        out[prompt] = {"digit": d, "rate": None if d is None else rates[d], "rates": rates, "images": images}
    return out


# -----------------------------------------------------------------------------
# metric registry entry

def _group_rates(res: dict, prompts: dict) -> dict:
    """With a prompts JSON: the target prompt's and the synonyms' share of the erased digit, the other prompts'
    share of their own digit (pooled over images), and the target prompt's unsure share."""
    from ldm.evaluation.clip_score import folder_prompt_names
    from ldm.prompts import class_dirs, experiment_prompts
    target = digit_of_text(prompts["target"])
    names = {**folder_prompt_names(prompts), **{f: p for p, f in class_dirs(experiment_prompts(prompts)).items()}}
    by_prompt = {p: name for name, p in names.items() if name in res["folders"]}  # generate_images.py's folders too

    def pooled(ps, digit_of):
        fs = [(res["folders"][by_prompt[p]], digit_of(p)) for p in ps if p in by_prompt and digit_of(p) is not None]
        n = sum(f["n"] for f, _ in fs)
        return sum(f["rates"][d] * f["n"] for f, d in fs) / n if n else None
    others = [p for p in prompts.get("other", []) if p]
    t = res["folders"].get(by_prompt.get(prompts["target"], ""), {})
    return {"target_rate": pooled([prompts["target"]], lambda p: target),
            "synonyms_rate": pooled(prompts.get("synonyms", []), lambda p: target),
            "others_accuracy": pooled(others, digit_of_text), "target_unsure": t.get("unsure_rate")}


def run(args):
    """`compute_metrics.py -m digits --images DIR [--prompts_json P] [--output_dir OUT]`."""
    prompts = None
    if getattr(args, "prompts_json", None):
        from ldm.prompts import read_prompts_json
        prompts = read_prompts_json(args.prompts_json)
    res = digit_rates(args.images, prompts)
    out_dir = Path(args.output_dir or args.images)
    header = ["folder", "n", "digit", "rate"] + [f"rate_{d}" for d in range(10)]
    rows = [[name, f["n"], "" if f["digit"] is None else f["digit"], "" if f["rate"] is None else f"{f['rate']:.4f}"]
            + [f"{r:.4f}" for r in f["rates"]] for name, f in res["folders"].items()]
    rows.append(["all", res["all"]["n"], "", ""] + [f"{r:.4f}" for r in res["all"]["rates"]])
    rates_csv, summary_csv, summary_md = (out_dir / "digits_rates.csv", out_dir / "digits_summary.csv",
                                          out_dir / "digits_summary.md")
    atomic_write_text(rates_csv, csv_text(header, rows))
    summary = [("images_evaluated", res["all"]["n"]), ("images_unreadable", len(res["unreadable"]))]
    summary += [(f"rate_{d}", f"{r:.4f}") for d, r in enumerate(res["all"]["rates"])]
    target_digit = digit_of_text(prompts["target"]) if prompts else None
    groups = _group_rates(res, prompts) if target_digit is not None else {}
    if target_digit is not None:
        summary.append(("target_digit", target_digit))
        summary += [(k, "" if v is None else f"{v:.4f}") for k, v in groups.items()]
        for name, f in res["folders"].items():
            summary.append((f"{name}_target_rate", f"{f['rates'][target_digit]:.4f}"))
    for name, f in res["folders"].items():
        if f["rate"] is not None:
            summary.append((f"{name}_own_rate", f"{f['rate']:.4f}"))
    write_summary_csv(summary_csv, summary)
    atomic_write_text(summary_md, "# digits\n\n" + markdown_table(header, rows))
    if groups:  # the erased digit and the preserved ones apart (a mean over both would say nothing)
        print(f"digits: {res['all']['n']} images; " + ", ".join(
            f"{k} {'-' if v is None else f'{v:.1%}'}" for k, v in groups.items()))
    else:
        print(f"digits: {res['all']['n']} images; rates " + ", ".join(f"{r:.2f}" for r in res["all"]["rates"]))
    return [rates_csv, summary_csv, summary_md]
