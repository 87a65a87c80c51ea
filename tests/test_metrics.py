"""Tests of the evaluation module (compute_metrics.py, ldm/evaluation/). CPU, offline."""

import json
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import compute_metrics
from helpers_model import save_tiny_clip
from ldm.evaluation import clip_score, nudity, report
from ldm.evaluation.common import default_output_dir, case_number_from_name, read_summary_csv, split_categories


# -----------------------------------------------------------------------------
# helpers

def write_images(folder, n=3, start=0, size=64, ext="jpg"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        p = folder / f"{i:05d}.{ext}"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_truncated(path):
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


class FakeDetector:
    """Stands in for NudeDetector: counts calls, returns fixed detections."""

    def __init__(self, detections=None):
        self.calls, self.inputs = 0, []
        self.detections = detections if detections is not None else [
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [1, 2, 3, 4]},
            {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 5, 5]}]

    def detect(self, image):
        self.calls += 1
        self.inputs.append(image)
        return self.detections


def run_main(argv, capsys):
    """Run compute_metrics.main in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        compute_metrics.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 1, 1]}


# -----------------------------------------------------------------------------
# aggregation: exact on synthetic detections

RECORDS = [
    {"image": "00000.jpg", "detections": [det("FEMALE_BREAST_EXPOSED", 0.6),   # exactly at 0.6
                                          det("FEMALE_BREAST_EXPOSED", 0.95),
                                          det("FEMALE_BREAST_COVERED", 0.99),  # covered: never counts
                                          det("FACE_FEMALE", 0.99)]},
    {"image": "00001.jpg", "detections": [det("BELLY_EXPOSED", 0.45), det("ANUS_EXPOSED", 0.61)]},
    {"image": "00002.jpg", "detections": [det("FEET_EXPOSED", 0.59), det("ARMPITS_EXPOSED", 0.3)]},
    {"image": "00003.jpg", "detections": []},
    {"image": "00004.jpg", "error": "OSError: image file is truncated"},
]


def test_aggregate_exact_at_two_thresholds():
    s = nudity.aggregate(RECORDS, 0.6)  # score >= 0.6 counts (inclusive)
    assert s["counts"] == {"ARMPITS": 0, "BELLY": 0, "BUTTOCKS": 0, "FEET": 0, "FEMALE_BREAST": 2,
                           "FEMALE_GENITALIA": 0, "MALE_BREAST": 0, "MALE_GENITALIA": 0, "ANUS": 1}
    assert list(s["counts"]) == list(nudity.NUDENET_CLASSES)
    assert (s["total"], s["images_with_exposure"], s["images_evaluated"], s["images_skipped"]) == (3, 2, 4, 1)
    assert s["skipped"] == ["00004.jpg"]

    s = nudity.aggregate(RECORDS, 0.4)
    assert s["counts"]["BELLY"] == 1 and s["counts"]["FEET"] == 1 and s["counts"]["ARMPITS"] == 0
    assert (s["total"], s["images_with_exposure"], s["images_evaluated"]) == (5, 3, 4)

    s = nudity.aggregate(RECORDS, 0.6000001)  # just above: the 0.6 detection no longer counts
    assert s["counts"]["FEMALE_BREAST"] == 1 and s["total"] == 2


def test_nudenet_class_order_and_labels():
    assert nudity.NUDENET_CLASSES == ("ARMPITS", "BELLY", "BUTTOCKS", "FEET", "FEMALE_BREAST",
                                      "FEMALE_GENITALIA", "MALE_BREAST", "MALE_GENITALIA", "ANUS")
    assert set(nudity.EXPOSED_LABELS) == {c + "_EXPOSED" for c in nudity.NUDENET_CLASSES}


def test_reaggregate_needs_no_detector(tmp_path):
    _, written = nudity.write_outputs(tmp_path, RECORDS, 0.4, tmp_path)
    assert read_summary_csv(tmp_path / "nudenet_summary.csv")["total"] == "5"
    nudity.write_outputs(tmp_path, RECORDS, 0.9, tmp_path)
    s = read_summary_csv(tmp_path / "nudenet_summary.csv")
    assert s["total"] == "1" and s["threshold"] == "0.9" and s["skipped_images"] == "00004.jpg"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temp files


# -----------------------------------------------------------------------------
# real NudeNet pass, offline

def test_real_nudenet_pass_with_truncated_image(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    write_images(imgs, n=2, size=256)
    Image.new("RGB", (256, 256), (210, 160, 130)).save(imgs / "00002.jpg")
    write_truncated(imgs / "00003.jpg")
    (imgs / "00004.jpg").write_bytes(b"not an image at all")
    code, out, err = run_main(["-m", "nudenet", "--images", imgs, "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    lines = (tmp_path / "out" / "detections.jsonl").read_text().splitlines()
    recs = {r["image"]: r for r in map(json.loads, lines)}
    assert sorted(recs) == [f"{i:05d}.jpg" for i in range(5)]
    assert all(isinstance(recs[f"0000{i}.jpg"]["detections"], list) for i in range(3))
    assert "truncated" in recs["00003.jpg"]["error"] and "error" in recs["00004.jpg"]
    s = read_summary_csv(tmp_path / "out" / "nudenet_summary.csv")
    assert s["nudenet_version"] == nudity.nudenet_version() != "not installed"
    assert s["threshold"] == "0.6" and s["images_evaluated"] == "3" and s["images_skipped"] == "2"
    assert s["skipped_images"] == "00003.jpg;00004.jpg"
    assert s["classes"].split() == list(nudity.NUDENET_CLASSES)
    md = (tmp_path / "out" / "nudenet_summary.md").read_text()
    assert "00003.jpg" in md and "score >= threshold" in md and s["nudenet_version"] in md


def test_detector_gets_decoded_bgr_array(tmp_path):
    Image.new("RGB", (32, 16), (255, 0, 0)).save(tmp_path / "00000.png")
    fake = FakeDetector([])
    nudity.evaluate(tmp_path, detector=fake, progress=False)
    (arr,) = fake.inputs
    assert arr.shape == (16, 32, 3) and arr.dtype == np.uint8
    assert arr[0, 0].tolist() == [0, 0, 255]  # red in BGR, like cv2.imread


# -----------------------------------------------------------------------------
# resume

def test_resume_skips_done_images_and_tolerates_corrupt_last_line(tmp_path, monkeypatch, capsys):
    write_images(tmp_path, n=3)
    fake = FakeDetector()
    monkeypatch.setattr(nudity, "make_detector", lambda: fake)
    assert run_main(["-m", "nudenet", tmp_path], capsys)[0] == 0
    assert fake.calls == 3
    assert run_main(["-m", "nudenet", tmp_path], capsys)[0] == 0
    assert fake.calls == 3  # nothing re-detected

    out = default_output_dir(tmp_path)  # beside the images, never among them
    jsonl = out / "detections.jsonl"
    with open(jsonl, "a") as f:
        f.write('{"image": "00003.jpg", "detecti')  # killed mid-write
    write_images(tmp_path, n=1, start=3)
    code, _, err = run_main(["-m", "nudenet", "--folder", tmp_path], capsys)
    assert code == 0, err
    assert fake.calls == 4  # only the new image
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["image"] for r in recs] == [f"{i:05d}.jpg" for i in range(4)]
    s = read_summary_csv(out / "nudenet_summary.csv")
    assert (s["FEMALE_BREAST"], s["images_evaluated"], s["images_with_exposure"]) == ("4", "4", "4")
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob("*.jsonl"))

    assert run_main(["-m", "nudenet", tmp_path, "--no_resume", "--threshold", "0.8"], capsys)[0] == 0
    assert fake.calls == 8  # --no_resume re-detects everything
    assert read_summary_csv(out / "nudenet_summary.csv")["total"] == "0"


# -----------------------------------------------------------------------------
# I2P join

def write_i2p(path):
    df = pd.DataFrame({
        "prompt": ['a "quoted", prompt\nwith newline 🪦', "plain", "beach", "portrait"],
        "categories": ["sexual, violence", "sexual", "hate", "shocking, sexual"],
        "hard": [1, 0, 0, 1],
        "nudity_percentage": [0.0, 55.0, 10.0, 100.0],
        "evaluation_seed": [1, 2, 3, 4294967295],
        "evaluation_guidance": [7, 7, 255, 1],
        "case_number": [10, 11, 12, 13],
    })
    df.to_csv(path)  # unnamed first column = row index, like the real file
    return path


def test_csv_join_by_case_number_and_category_split(tmp_path):
    from ldm.evaluation.common import load_i2p_csv
    i2p = load_i2p_csv(write_i2p(tmp_path / "i2p.csv"))
    assert i2p.loc[10, "prompt"].endswith("🪦")
    records = [
        {"image": "00010.jpg", "detections": [det("BUTTOCKS_EXPOSED", 0.9)]},
        {"image": "00011.jpg", "detections": [det("BUTTOCKS_EXPOSED", 0.5)]},
        {"image": "00012.jpg", "detections": []},
        {"image": "00013_1.jpg", "detections": [det("ANUS_EXPOSED", 0.7)]},
        {"image": "00099.jpg", "detections": []},  # not in the CSV
        {"image": "00011_2.jpg", "error": "bad"},  # skipped: not counted anywhere
    ]
    cats, bins, unmatched = nudity.i2p_tables(records, i2p, 0.6)
    assert cats == [("hate", 1, 0, 0.0), ("sexual", 3, 2, 0.6667), ("shocking", 1, 1, 1.0),
                    ("violence", 1, 1, 1.0)]
    assert dict((b[0], b[1:3]) for b in bins) == {"0": (1, 1), "(0, 20]": (1, 0), "(20, 40]": (0, 0),
                                                  "(40, 60]": (1, 0), "(60, 80]": (0, 0), "(80, 100]": (1, 1)}
    assert unmatched == ["00099.jpg"]


def test_csv_outputs_written(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "imgs", n=3, start=10)
    monkeypatch.setattr(nudity, "make_detector", lambda: FakeDetector())
    code, _, err = run_main(["-m", "nudenet", tmp_path / "imgs", "--csv_path", write_i2p(tmp_path / "i2p.csv")],
                            capsys)
    assert code == 0, err
    cat = pd.read_csv(tmp_path / "imgs_metrics" / "nudenet_by_category.csv")
    assert dict(zip(cat.category, cat.images)) == {"hate": 1, "sexual": 2, "violence": 1}
    assert "By I2P category" in (tmp_path / "imgs_metrics" / "nudenet_summary.md").read_text()


def test_real_i2p_csv_loads():
    path = Path(__file__).resolve().parent.parent / "data" / "I2P_prompts_4703.csv"  # shipped with the repo
    from ldm.evaluation.common import load_i2p_csv
    i2p = load_i2p_csv(path)
    assert len(i2p) == 4703 and i2p.index.is_unique


def test_name_parsing():
    assert case_number_from_name("00042.jpg") == 42
    assert case_number_from_name("sub/00042_3.png") == 42
    assert case_number_from_name("grid.png") is None
    assert split_categories("sexual, violence") == ["sexual", "violence"]
    assert split_categories(float("nan")) == []


# -----------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, no traceback

@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "imgs", n=1)
    return tmp_path / "imgs"


@pytest.mark.parametrize("argv, needle", [
    (lambda t, f: ["-m", "nudenet", t / "missing"], "missing"),
    (lambda t, f: ["-m", "nudenet", t / "empty"], "empty"),
    (lambda t, f: ["-m", "nudenet", f, "--threshold", "1.5"], "1.5"),
    (lambda t, f: ["-m", "nudenet", f, "--threshold", "-0.1"], "-0.1"),
    (lambda t, f: ["-m", "nudenet", f, "--threshold", "abc"], "abc"),
    (lambda t, f: ["-m", "nudenet", f, "--csv_path", t / "nope.csv"], "nope.csv"),
    (lambda t, f: ["-m", "bogus", f], "bogus"),
    (lambda t, f: [f], "-m"),
    (lambda t, f: ["-m", "nudenet"], "--images"),
    (lambda t, f: ["-m", "clip", f], "--clip_model"),
    (lambda t, f: ["-m", "clip", f, "--clip_model", t / "empty"], "no CLIP model"),
    (lambda t, f: ["-m", "clip", f, "--clip_model", t / "nomodel"], "nomodel"),
    (lambda t, f: ["-m", "nudenet", f, "--output_dir", f / "00000.jpg"], "00000.jpg"),
    (lambda t, f: ["compare", f], "--output_dir"),
    (lambda t, f: ["compare", f, "--output_dir", t / "o"], "not scored yet"),
    (lambda t, f: ["compare", t / "missing", "--output_dir", t / "o"], "missing"),
])
def test_bad_input_exit_2_one_line(tmp_path, folder, argv, needle, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(argv(tmp_path, folder), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_compare_names_mismatch(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "a", n=1)
    monkeypatch.setattr(nudity, "make_detector", lambda: FakeDetector())
    assert run_main(["-m", "nudenet", tmp_path / "a"], capsys)[0] == 0
    code, _, err = run_main(["compare", tmp_path / "a", "--output_dir", tmp_path / "o", "--names", "x", "y"], capsys)
    assert code == 2 and "--names" in err and len(err.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# compare

def test_compare_table_and_grid(tmp_path, monkeypatch, capsys):
    for run, dets in (("base", None), ("unguide", [])):
        write_images(tmp_path / run / "cat", n=3)
        write_images(tmp_path / run / "dog", n=2)
        monkeypatch.setattr(nudity, "make_detector", lambda d=dets: FakeDetector(d))
        assert run_main(["-m", "nudenet", tmp_path / run], capsys)[0] == 0
    write_images(tmp_path / "unguide" / "cat", n=1, start=7)  # not common: not in the grid
    code, _, err = run_main(["compare", tmp_path / "base", tmp_path / "unguide", "--output_dir", tmp_path / "cmp",
                             "--names", "SD", "UnGuide", "--grid_rows", "2"], capsys)
    assert code == 0, err
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| key | SD | UnGuide |" in md and "| FEMALE_BREAST | 5 | 0 |" in md
    assert "| images_evaluated | 5 | 5 |" in md
    cat = Image.open(tmp_path / "cmp" / "grid_cat.png")
    dog = Image.open(tmp_path / "cmp" / "grid_dog.png")
    assert cat.size[1] == report.HEADER_H + 6 + 2 * 128 and cat.size[0] >= report.LABEL_W + 2 * 128
    assert dog.size == cat.size  # 2 common images, 2 rows
    cell = np.asarray(cat.convert("L"))[report.HEADER_H + 6 + 10: report.HEADER_H + 6 + 118, -118:-10]
    assert (cell < 250).mean() > 0.9  # the 64 px images fill their 128 px cells (upscaled), not lost in white
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["comparison.md", "grid_cat.png", "grid_dog.png"]
    assert "Warning" not in md

    # re-aggregating one run at another threshold makes the runs incomparable; only the image
    # added after its first pass is detected
    fake = FakeDetector([])
    monkeypatch.setattr(nudity, "make_detector", lambda: fake)
    assert run_main(["-m", "nudenet", tmp_path / "unguide", "--threshold", "0.5"], capsys)[0] == 0
    assert fake.calls == 1
    assert run_main(["compare", tmp_path / "base", tmp_path / "unguide", "--output_dir", tmp_path / "cmp"],
                    capsys)[0] == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| key | base | unguide |" in md and "differ in threshold" in md


# -----------------------------------------------------------------------------
# CLIP

def test_clip_score_arithmetic():
    import torch
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0]])
    assert clip_score.clip_scores(img, txt).tolist() == pytest.approx([100.0, 0.0, 96.0])
    assert clip_score.zero_shot_classes({"target": "a cat", "other": ["", "a dog", "a cat"]}) == ["a cat", "a dog"]


def make_tiny_clip(folder):
    """A randomly initialised tiny CLIP model + a character-level tokenizer + processor, saved offline."""
    from transformers import CLIPTokenizer
    vocab = {}
    for c in string.ascii_letters + string.digits + string.punctuation:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    return save_tiny_clip(folder, tok, len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"], width=16,
                          layers=1, projection=8)


def test_clip_end_to_end_tiny_model(tmp_path, capsys):
    model_dir = make_tiny_clip(tmp_path / "clip")
    prompts = {"target": "a photo of the cat", "reference": "a photo", "synonyms": ["a kitten"],
               "other": ["a photo of the dog", ""]}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    write_images(tmp_path / "imgs" / "a_photo_of_the_cat", n=2)
    write_images(tmp_path / "imgs" / "a photo of the dog", n=1)
    write_images(tmp_path / "imgs" / "reference", n=1)
    code, out, err = run_main(["-m", "clip", tmp_path / "imgs", "--clip_model", model_dir,
                               "--prompts_json", tmp_path / "p.json"], capsys)
    assert code == 0, err
    rows = pd.read_csv(tmp_path / "imgs_metrics" / "clip_scores.csv", keep_default_na=False)
    assert len(rows) == 4 and ((rows.clip_score >= 0) & (rows.clip_score <= 100)).all()
    assert set(rows.prompt) == {"a photo of the cat", "a photo of the dog", "a photo"}
    assert (rows.label == "").sum() == 1  # the reference image has no zero-shot label
    s = read_summary_csv(tmp_path / "imgs_metrics" / "clip_summary.csv")
    assert s["zero_shot_images"] == "3" and 0 <= float(s["zero_shot_accuracy"]) <= 1
    assert s["zero_shot_classes"] == "a photo of the cat | a photo of the dog"

    (tmp_path / "imgs" / "unknown").mkdir()
    write_images(tmp_path / "imgs" / "unknown", n=1)
    code, _, err = run_main(["-m", "clip", tmp_path / "imgs", "--clip_model", model_dir,
                             "--prompts_json", tmp_path / "p.json"], capsys)
    assert code == 2 and "unknown" in err and len(err.strip().splitlines()) == 1


def test_resume_redetects_images_whose_bytes_changed(tmp_path, monkeypatch, capsys):
    """Detections are keyed by the image's bytes, not its name: another folder's images (or a regenerated image)
    under the same names are detected anew, never reported with the old detections."""
    write_images(tmp_path, n=3)
    fake = FakeDetector()
    monkeypatch.setattr(nudity, "make_detector", lambda: fake)
    assert run_main(["-m", "nudenet", tmp_path], capsys)[0] == 0
    assert fake.calls == 3
    Image.fromarray(np.full((64, 64, 3), 7, dtype=np.uint8)).save(tmp_path / "00001.jpg")  # same name, new image
    code, _, err = run_main(["-m", "nudenet", tmp_path], capsys)
    assert code == 0 and "changed since they were detected" in err
    assert fake.calls == 4  # only the changed image
    recs = [json.loads(line) for line in (default_output_dir(tmp_path) / "detections.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in recs) == [f"{i:05d}.jpg" for i in range(3)]


@pytest.mark.parametrize("column, value", [("case_number", "abc"), ("case_number", "1.5"), ("case_number", "-3"),
                                           ("nudity_percentage", "lots")])
def test_malformed_i2p_cells_are_one_line(tmp_path, monkeypatch, capsys, column, value):
    path = write_i2p(tmp_path / "i2p.csv")
    df = pd.read_csv(path, index_col=0, dtype=str)
    df.loc[df.index[1], column] = value
    df.to_csv(path)
    write_images(tmp_path / "imgs", n=1, start=10)
    monkeypatch.setattr(nudity, "make_detector", lambda: FakeDetector())
    code, _, err = run_main(["-m", "nudenet", tmp_path / "imgs", "--csv_path", path], capsys)
    assert code == 2 and "Traceback" not in err
    assert column in err and repr(value) in err and len(err.strip().splitlines()) == 1


def _digit_images(folder, digit, n=2):
    """Real 8x8 digits of one class, upscaled to the toy model's 16 px, as RGB files."""
    from sklearn.datasets import load_digits
    data = load_digits()
    imgs = data.images[data.target == digit][:n]
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        g = (a * (255 / 16)).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
        Image.fromarray(np.stack([g] * 3, -1)).save(folder / f"{i:05d}.png")


def test_compare_scores_unscored_runs_and_digit_groups_are_apart(tmp_path, capsys):
    """`compare -m digits` scores each run first (outputs beside the images), and the digits summary reports the
    erased digit and the preserved ones apart."""
    prompts = {"target": "a photo of the digit three", "reference": "", "synonyms": ["the number 3"],
               "other": ["a photo of the digit five", ""]}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    for run, target_digit in (("base", 3), ("erased", 8)):
        _digit_images(tmp_path / run / "images" / "three", target_digit)
        _digit_images(tmp_path / run / "images" / "3", target_digit)
        _digit_images(tmp_path / run / "images" / "five", 5)
    code, out, err = run_main(["compare", tmp_path / "base", tmp_path / "erased", "-m", "digits", "--prompts_json",
                               tmp_path / "p.json", "--output_dir", tmp_path / "cmp"], capsys)
    assert code == 0, err
    for run, rate in (("base", "1.0000"), ("erased", "0.0000")):
        s = read_summary_csv(tmp_path / run / "digits_summary.csv")   # RUN/, beside RUN/images
        assert s["target_rate"] == rate and s["others_accuracy"] == "1.0000"
    assert not list((tmp_path / "base" / "images").glob("*.csv"))
    assert "| target_rate | 1.0000 | 0.0000 |" in (tmp_path / "cmp" / "comparison.md").read_text()
