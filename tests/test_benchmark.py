"""benchmark.py: the tables' arithmetic on hand-made numbers, the spec's one-line errors, a reduced toy spec end to
end (train.py -> generate_images.py -> the digit judge -> tables and grid, each script in its own process) and a
rerun that redoes nothing finished."""
import json
import math
from pathlib import Path

import pytest
import yaml

from ldm.errors import UserError
from ldm.evaluation import benchmark as B
from ldm.evaluation.tables import ObjectRow, averages, harmonic_ho, nudenet_counts, object_row

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ tables, by hand

def test_ho_is_the_harmonic_mean_of_the_three_terms():
    # 1 - Acc_e = 0.9, Acc_s = 0.8, 1 - Acc_g = 0.6: 3 / (1/0.9 + 1/0.8 + 1/0.6)
    assert harmonic_ho(0.1, 0.8, 0.4) == pytest.approx(3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.6))
    assert harmonic_ho(0.0, 1.0, 0.0) == 1.0          # perfect erasure, nothing damaged
    assert harmonic_ho(1.0, 1.0, 0.0) == 0.0          # the target untouched: a zero term, H_o 0
    assert harmonic_ho(0.0, 0.0, 0.0) == 0.0          # everything else destroyed
    with pytest.raises(ValueError):
        harmonic_ho(1.2, 0.5, 0.5)


def test_averages_are_means_over_concepts_of_each_column_and_of_h_o():
    rows = [ObjectRow("a", "m", 0.1, 0.8, 0.4), ObjectRow("b", "m", 0.3, 1.0, 0.2), ObjectRow("a", "base", 1, 1, 1)]
    (m, base) = averages(rows, ["m", "base"])
    assert m["acc_e"] == pytest.approx(0.2) and m["acc_s"] == pytest.approx(0.9) and m["acc_g"] == pytest.approx(0.3)
    assert m["h_o"] == pytest.approx((harmonic_ho(0.1, 0.8, 0.4) + harmonic_ho(0.3, 1.0, 0.2)) / 2)
    assert base["h_o"] == 0.0 and m["concepts"] == 2


def test_object_row_pools_images_over_prompts():
    per = {"t": {"n": 4, "counts": {"3": 1, "8": 3}}, "s1": {"n": 2, "counts": {"3": 2}},
           "s2": {"n": 2, "counts": {"5": 2}}, "o1": {"n": 5, "counts": {"1": 5}}, "o2": {"n": 5, "counts": {"2": 4}}}
    label = {"t": 3, "s1": 3, "s2": 3, "o1": 1, "o2": 2}
    r = object_row("three", "m", per, {"target": ["t"], "synonyms": ["s1", "s2"], "others": ["o1", "o2"]},
                   label.get)
    assert (r.acc_e, r.acc_g, r.acc_s) == (0.25, 0.5, 0.9) and (r.n_e, r.n_g, r.n_s) == (4, 4, 10)
    assert r.h_o == pytest.approx(harmonic_ho(0.25, 0.9, 0.5))


def test_nudenet_counts_per_class_at_the_threshold_boundary():
    det = lambda c, s: {"class": c, "score": s, "box": [0, 0, 1, 1]}  # noqa: E731
    records = [
        {"image": "00000.jpg", "detections": [det("FEMALE_BREAST_EXPOSED", 0.6), det("BELLY_EXPOSED", 0.5999),
                                              det("FEMALE_BREAST_COVERED", 0.99), det("FEET_EXPOSED", 0.61)]},
        {"image": "00001.jpg", "detections": [det("FEMALE_BREAST_EXPOSED", 0.95), det("MALE_GENITALIA_EXPOSED", 1.0)]},
        {"image": "00002.jpg", "detections": [det("ARMPITS_EXPOSED", 0.3)]},
        {"image": "00003.jpg", "error": "truncated"},
    ]
    s = nudenet_counts(records, 0.6)
    assert s["counts"]["FEMALE_BREAST"] == 2 and s["counts"]["FEET"] == 1 and s["counts"]["MALE_GENITALIA"] == 1
    assert s["counts"]["BELLY"] == 0 and s["counts"]["ARMPITS"] == 0          # below 0.6; covered never counts
    assert s["total"] == 4 and s["images_with_exposure"] == 2 and s["images_evaluated"] == 3
    assert nudenet_counts(records, 0.3)["counts"]["ARMPITS"] == 1
    with pytest.raises(UserError, match="0.2"):  # NudeNet 3.x reports nothing below 0.2: not measurable
        nudenet_counts(records, 0.1)


# ------------------------------------------------------------------------------------------ the spec

def _spec(tmp_path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "configs/benchmark/toy.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "out")
    for k, v in changes.items():
        raw[k] = v
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw))
    return path


def test_shipped_specs_parse_and_share_one_training_between_adapter_alone_and_unguide(tmp_path):
    spec = B.load_spec(ROOT / "configs/benchmark/toy.yaml", {"output_dir": str(tmp_path)})
    assert [c.name for c in spec.concepts] == ["three", "five", "zero"]
    bench = B.Benchmark(spec)
    trains = [s for s in bench.stages if s.kind == "train"]
    assert len(trains) == 4 * 3  # (one LoRA for three rows, ESD-x for two, ESD-u, SepCE) x three digits
    lora = bench.trainings[("adapter alone", "three")]
    assert bench.trainings[("UnGuide, release rule", "three")] is lora
    assert bench.trainings[("UnGuide, guarded", "three")] is lora
    assert bench.trainings[("UnGuide-ESD-x, guarded", "five")] is bench.trainings[("ESD-x", "five")]
    # every training stores a threshold calibrated at the spec's stability test (t_enc 25), given or not: a
    # threshold measured at train.py's default t_enc (40) would flag by ratios of another test (the ESD-x delta
    # for zero: target 1.88 d("") at t_enc 40, 0.98 at 25)
    for m in spec.methods:
        if m.train:
            argv = bench._train_argv(m, spec.concepts[0])
            assert argv[argv.index("--calibrate_t_enc") + 1] == "25" and argv.count("--calibrate_t_enc") == 1, m.name
    # the SD spec needs the SD weights and a local CLIP folder: without them, one line naming the field
    with pytest.raises(UserError, match=r"model\.ckpt|judge\.clip_model"):
        B.load_spec(ROOT / "configs/benchmark/sd-v1-4.yaml")


def test_sd_spec_plans_every_table_once_its_files_exist(tmp_path):
    (tmp_path / "sd.ckpt").write_bytes(b"stand-in")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    (tmp_path / "inception.pth").write_bytes(b"stand-in")
    spec = B.load_spec(ROOT / "configs/benchmark/sd-v1-4.yaml", {
        "model.ckpt": str(tmp_path / "sd.ckpt"), "judge": {"clip_model": str(tmp_path / "clip")},
        "quality.clip_model": str(tmp_path / "clip"), "quality.inception_weights": str(tmp_path / "inception.pth"),
        "output_dir": str(tmp_path / "out")})
    bench = B.Benchmark(spec)
    kinds = [s.kind for s in bench.stages]
    # trainings: LoRA x (10 classes + nudity), ESD-x x 10, ESD-u x nudity, SepCE x 10
    assert kinds.count("train") == 11 + 10 + 1 + 10
    assert kinds.count("generate") == 10 * 6 and kinds.count("i2p") == 5 and kinds.count("attack") == 2 * 4
    assert bench.trainings[("ESD-u", "nudity")].key["train"][:4] == ["--method", "esd", "--train_method", "noxattn"]
    # the paper's UnGuide row: the release's rule and threshold; ours: guarded, the calibrated threshold where the
    # run has one (the scripts' default: no --threshold flag)
    release, guarded = (bench.generations[(m, "cat")].key["sampling"] for m in ("UnGuide", "UnGuide, guarded"))
    assert release[-4:] == ["--decision", "release", "--threshold", "1"]
    assert guarded[-2:] == ["--decision", "guarded"] and "--threshold" not in guarded


@pytest.mark.parametrize("change, field", [
    ({"colour": 1}, "colour: unknown key"),
    ({"model": {"config": "configs/toy/digits-inference.yaml", "ckpt": "models/nope.safetensors"}}, "model.ckpt"),
    ({"methods": [{"name": "x", "train": {"method": "mace"}}]}, "methods[0].train.method: 'mace' is not one of"),
    ({"methods": [{"name": "x", "train": {"method": "esd", "rank": 1}}]}, "methods[0].train.rank: unknown key"),
    ({"methods": [{"name": "b", "w1": 0, "w2": 0}]}, "methods[0]: w1 0, w2 0 need an adapter"),
    ({"methods": [{"name": "b"}, {"name": "b"}]}, "methods[1].name: 'b' twice"),
    ({"concepts": [{"name": "three", "prompts_json": "data/digits/missing.json"}]}, "concepts[0].prompts_json"),
    ({"attacks": [{"attack": "ringabell", "methods": ["MACE"]}]}, "attacks[0].methods: 'MACE' is not a method"),
    ({"attacks": [{"attack": "p4d"}]}, "attacks[0].attack"),
    ({"sampling": {"steps": 10, "t_enc": 10}}, "sampling.t_enc"),
    ({"quality": {"lpips_weights": "x"}}, "quality.lpips_weights: x: file not found"),
    ({"quality": {"lpips_weights": ["configs/benchmark/toy.yaml"]}},
     "quality.lpips_weights: " + str(ROOT / "configs/benchmark/toy.yaml") + ": not a weights file torch can read"),
    ({"quality": {"lpips_weights": "models/toy-digits.safetensors"}},
     "quality.lpips_weights: " + str(ROOT / "models/toy-digits.safetensors") + ": not the LPIPS alex weights"),
    ({"quality": {"lpips_weights": "models/toy-digits.safetensors", "lpips_net": "squeeze"}},
     "quality.lpips_net: 'squeeze' is not one of alex, vgg"),
    ({"quality": {"lpips_net": "vgg"}}, "quality.lpips_net: needs quality.lpips_weights"),
    ({"concepts": [{"name": "cat", "prompts_json": "data/cat.json"}]}, "concepts[0].prompts_json: the digits judge"),
    ({"i2p": {"csv": "data/I2P_prompts_4703.csv", "prompts_json": "data/nsfw.json", "methods": ["MACE"]}},
     "i2p.methods: 'MACE'"),
    ({"i2p": {"csv": "data/I2P_prompts_4703.csv", "prompts_json": "data/nsfw.json", "threshold": 0.1}},
     "i2p.threshold"),
    ({"quality": {"prompts_csv": "data/coco_captions.csv"}}, "quality.prompts_csv: data/coco_captions.csv: file not"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "limit": 0}}, "quality.limit: 0 must be >= 1"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "limit": 2.5}}, "quality.limit: 2.5 is not an integer"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "limit": "10"}}, "quality.limit: '10' is not an"),
    ({"quality": {"limit": 10}}, "quality.limit: needs quality.prompts_csv"),
    ({"quality": {"concepts": ["three"]}}, "quality.concepts: needs quality.prompts_csv"),
    ({"quality": {"prompts_csv": "data/digits/three.json", "limit": 3}}, "quality.prompts_csv: "),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv"}}, "quality.prompts_csv: nothing to measure"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "clip_model": "data",
                  "concepts": ["three", "nudity"]}}, "quality.concepts: 'nudity' is not a concept of the spec"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "clip_model": "data", "concepts": []}},
     "quality.concepts: a non-empty list"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "inception_weights": "models/toy-digits.safetensors",
                  "prompts_reference_images": "models/coco"}}, "quality.prompts_reference_images: models/coco: folder"),
    ({"quality": {"prompts_csv": "data/I2P_prompts_4703.csv", "inception_weights": "models/toy-digits.safetensors",
                  "prompts_reference_images": "base"}, "methods": [{"name": "x", "files": {
                      "three": "models/toy-digits.safetensors"}}]},
     "quality.prompts_reference_images: 'base' needs the base model among the methods"),
])
def test_spec_errors_are_one_line_naming_the_field(tmp_path, change, field):
    with pytest.raises(UserError) as err:
        B.load_spec(_spec(tmp_path, **change))
    msg = str(err.value)
    assert field in msg and "\n" not in msg and str(tmp_path / "spec.json") in msg


@pytest.mark.parametrize("text, limit, field", [
    ("caption,evaluation_seed\na cat,1\n", None, "no 'prompt' column (columns: caption, evaluation_seed)"),
    ("prompt,seed\na cat,1\na dog,2\n", None, "coco.csv: a 'seed' column: name it 'evaluation_seed'"),
    ("prompt,evaluation_seed\n,1\na dog,2\n", 1, "coco.csv: no usable prompt row in its first 1 rows"),
    ("prompt,evaluation_seed\na cat,1\n,2\n", None, "coco.csv: FID needs at least 2 images, 1 usable row in it"),
    ("prompt\na cat\na dog\n", None, "quality.prompts_reference_images: " + "{ref}: FID needs at least 2 reference"),
])
def test_prompt_set_csv_and_reference_errors_name_the_field(tmp_path, text, limit, field):
    """quality.prompts_csv is read as generate_images_nsfw.py reads it (ldm/prompts.py read_rows) when the spec is;
    each problem is one line naming the field."""
    from PIL import Image
    (tmp_path / "coco.csv").write_text(text)
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.new("RGB", (8, 8)).save(ref / "0.png")  # one image: enough only when the CSV fails first
    quality = {"prompts_csv": str(tmp_path / "coco.csv"), "inception_weights": "models/toy-digits.safetensors",
               "prompts_reference_images": str(ref)}
    if limit is not None:
        quality["limit"] = limit
    with pytest.raises(UserError) as err:
        B.load_spec(_spec(tmp_path, quality=quality))
    msg = str(err.value)
    assert field.format(ref=ref) in msg and "\n" not in msg and str(tmp_path / "spec.json") in msg
    assert ("quality.prompts_reference_images" if "reference" in field else "quality.prompts_csv") in msg


def test_sd_spec_with_a_prompt_set_plans_one_generation_per_model(tmp_path):
    """COCO-style prompts on the SD spec: the base model once, every erasing method per listed concept it applies
    to (its adapter for that concept), each followed by its scores; keyed by the CSV's content and the adapter."""
    (tmp_path / "sd.ckpt").write_bytes(b"stand-in")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    (tmp_path / "inception.pth").write_bytes(b"stand-in")
    (tmp_path / "coco").mkdir()
    for i in range(2):
        (tmp_path / "coco" / f"{i}.jpg").write_bytes(b"stand-in")  # listed, not read, when the spec is checked
    (tmp_path / "coco.csv").write_text("image_id,source,prompt,evaluation_seed\n9,coco,A cat on a mat.,41337\n"
                                       "7,coco,\"A bus, red.\",63155\n8,coco,A plane.,78978\n")
    overrides = {"model.ckpt": str(tmp_path / "sd.ckpt"), "judge": {"clip_model": str(tmp_path / "clip")},
                 "quality.clip_model": str(tmp_path / "clip"),
                 "quality.inception_weights": str(tmp_path / "inception.pth"), "output_dir": str(tmp_path / "out"),
                 "quality.prompts_csv": str(tmp_path / "coco.csv"), "quality.limit": 2,
                 "quality.prompts_reference_images": str(tmp_path / "coco"), "quality.concepts": ["cat", "nudity"]}
    bench = B.Benchmark(B.load_spec(ROOT / "configs/benchmark/sd-v1-4.yaml", overrides))
    assert bench.spec.quality["prompt_rows"] == 2
    assert sorted(bench.prompt_generations, key=str) == sorted([
        ("base", None), ("adapter alone", "cat"), ("adapter alone", "nudity"), ("UnGuide", "cat"),
        ("UnGuide", "nudity"), ("UnGuide, guarded", "cat"), ("UnGuide, guarded", "nudity"), ("ESD-x", "cat"),
        ("ESD-u", "nudity"), ("SepCE", "cat")], key=str)
    kinds = [s.kind for s in bench.stages]
    assert kinds.count("prompts") == kinds.count("score") == 10
    assert kinds.count("generate") == 10 * 6  # the rest of the plan as without the prompt set
    gen = bench.prompt_generations[("UnGuide", "cat")]
    assert gen.sharded and gen.key["adapter"] == bench.trainings[("UnGuide", "cat")].key
    assert gen.key["prompts_csv"][-2:] == ["--limit", "2"] and "--csv_path" not in gen.key["prompts_csv"]
    assert bench.prompt_generations[("base", None)].key["adapter"] is None
    score = bench.prompt_scores[("ESD-u", "nudity")]
    assert score.key["generation"] == bench.prompt_generations[("ESD-u", "nudity")].key
    assert score.key["reference"]["folder"] == str(tmp_path / "coco")
    # the default: every concept of the spec (not nudity); `base` as reference keys on the base model's images
    del overrides["quality.concepts"]
    overrides["quality.prompts_reference_images"] = "base"
    bench = B.Benchmark(B.load_spec(ROOT / "configs/benchmark/sd-v1-4.yaml", overrides))
    assert [s.kind for s in bench.stages].count("prompts") == 1 + 5 * 10  # adapter alone, UnGuide, UnGuide guarded, ESD-x, SepCE
    assert bench.prompt_scores[("SepCE", "dog")].key["reference"] == {
        "base": bench.prompt_generations[("base", None)].key}


def test_a_sharded_stage_finishes_when_every_rank_has_done_its_share(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = B.load_spec(_spec(tmp_path))
    bench = B.Benchmark(spec)
    ran = []
    st = B.Stage("generate", "g", tmp_path / "g", tmp_path / "g" / "stage.json", {"k": 1},
                 lambda: ran.append(1) or {}, sharded=True)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "stage.rank0-of-2.json").write_text(json.dumps({"seconds": 1.0}))  # rank 0 finished before
    bench.run_stage(st)
    assert ran == [1] and (tmp_path / "g" / "stage.rank1-of-2.json").is_file()


# ------------------------------------------------------------------------------------------ reduced toy run

def random_lpips_file(path: Path, seed: int = 0) -> Path:
    """An LPIPS (AlexNet) weights file of random values in our own names (one combined file); lin weights >= 0 as
    lpips' calibrated ones are."""
    import torch
    from safetensors.torch import save_file

    from ldm.evaluation.lpips import LPIPS
    torch.manual_seed(seed)
    state = {k: (v.abs() if k.startswith("lin") else v) for k, v in LPIPS("alex").state_dict().items()}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The shipped toy spec reduced: one digit, base + UnGuide, 4 images per prompt, DDIM 10, 20 iterations; LPIPS
    in the quality table from a random-weight file."""
    tmp = tmp_path_factory.mktemp("bench")
    raw = yaml.safe_load((ROOT / "configs/benchmark/toy.yaml").read_text())
    raw.update(output_dir=str(tmp / "out"), concepts=raw["concepts"][:1], attacks=[],
               quality={"lpips_weights": str(random_lpips_file(tmp / "lpips-random.safetensors"))})
    raw["sampling"].update(images_per_prompt=4, steps=10, t_enc=5, repeats=2)
    unguide = next(m for m in raw["methods"] if m["name"] == "UnGuide, release rule")
    unguide["name"] = "UnGuide"
    unguide["train"] = {**{k: v for k, v in unguide["train"].items() if not k.startswith(("check_", "calibrate_"))},
                        "iterations": 20}  # no erasure check at 20 iterations: it would train on to 600
    raw["methods"] = [raw["methods"][0], unguide]
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    bench = B.Benchmark(B.load_spec(path))
    bench.run()
    return path, bench


def test_reduced_toy_spec_writes_the_tables(toy_run):
    path, bench = toy_run
    out = bench.out
    rows = list(__import__("csv").DictReader((out / "tables" / "object.csv").open()))
    by = {(r["concept"], r["method"]): r for r in rows}
    assert set(by) == {("three", "base"), ("three", "UnGuide"), ("average", "base"), ("average", "UnGuide")}
    base = by[("three", "base")]
    assert float(base["acc_e"]) >= 0.75 and float(base["acc_g"]) >= 0.5   # the base model draws the digit
    assert float(base["acc_s"]) >= 0.75 and float(base["h_o"]) <= 0.3     # ... and keeps the others: low H_o
    for r in rows:
        assert 0.0 <= float(r["h_o"]) <= 1.0 and not math.isnan(float(r["h_o"]))
    assert int(base["images_e"]) == 4 and int(base["images_s"]) == 9 * 4
    cost = (out / "tables" / "cost.md").read_text()
    assert "UnGuide" in cost and "cpu_peak_rss" in cost
    text = (out / "results.md").read_text()
    assert "4 images per prompt" in text and "digit classifier" in text and "H_o" in text
    from PIL import Image
    with Image.open(out / "grids" / "three.png") as g:  # 13 prompts x 2 methods, 96 px cells
        assert g.width >= 2 * 96 and g.height >= 13 * 96
    assert (out / "spec.yaml").read_text() == path.read_text()


def test_quality_table_gives_lpips_to_the_base_models_image_of_the_same_seed(toy_run):
    """LPIPS like the pixel change: each method's image of an other prompt against the base model's image of that
    prompt and seed, averaged over the pairs; recomputed here from the image files with the module directly."""
    import numpy as np
    import torch
    from PIL import Image

    from ldm.evaluation.lpips import distance, load_lpips
    path, bench = toy_run
    rows = {r["method"]: r for r in __import__("csv").DictReader((bench.out / "tables" / "quality.csv").open())}
    assert rows["base"]["LPIPS vs base (others)"] == "0 (the base model)"
    model = load_lpips(bench.spec.quality["lpips_weights"], "alex")
    concept = bench.spec.concepts[0]
    dists, pixel = [], []
    for p in concept.groups()["others"]:
        folders = [json.loads((bench.generations[(m, "three")].folder / "decisions.json").read_text())["prompts"][p]
                   ["folder"] for m in ("UnGuide", "base")]
        mine, base = (bench.generations[(m, "three")].folder / "images" / f for m, f in zip(("UnGuide", "base"),
                                                                                           folders))
        names = sorted(f.name for f in mine.glob("*.jpg"))
        assert names == sorted(f.name for f in base.glob("*.jpg")) and len(names) == 4  # seeds 0..3 on both sides
        for n in names:
            a, b = (np.array(Image.open(d / n).convert("RGB")) for d in (mine, base))
            x0, x1 = (torch.from_numpy(v).permute(2, 0, 1)[None].float() / 255 for v in (a, b))
            dists.append(distance(model, x0, x1).item())
            pixel.append(np.abs(a.astype(float) - b.astype(float)).mean())
    assert len(dists) == 9 * 4
    assert float(rows["UnGuide"]["LPIPS vs base (others)"]) == pytest.approx(np.mean(dists), rel=1e-3)  # 4 digits
    assert float(rows["UnGuide"]["pixel change vs base (others)"]) == pytest.approx(np.mean(pixel), abs=0.01)
    assert np.mean(dists) > 0
    text = (bench.out / "tables" / "quality.md").read_text()
    print(text)
    assert "LPIPS: lpips v0.1 (alex)" in text and "not computed" in text  # CLIP and FID: no files given


def test_rerun_redoes_nothing_finished(toy_run, monkeypatch):
    path, bench = toy_run
    log = bench.out / "benchmark_log.jsonl"
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["action"] for e in first} == {"ran"} and len(first) == len(bench.stages)
    judged = bench.judged[("UnGuide", "three")].record
    judged.unlink()  # as if killed after generating UnGuide's images, before judging them
    rerun = B.Benchmark(B.load_spec(path))
    monkeypatch.setattr(rerun, "run_script", lambda *a, **k: pytest.fail(f"a script ran again: {a}"))
    rerun.run()
    second = [json.loads(line) for line in log.read_text().splitlines()][len(first):]
    assert [e["stage"] for e in second if e["action"] == "ran"] == ["judge three / UnGuide"]
    assert len([e for e in second if e["action"] == "reused"]) == len(rerun.stages) - 1


# ------------------------------------------------------------------------------------------ a prompt set (COCO-style)

PROMPT_CSV = "prompt,evaluation_seed\na handwritten 1,5\na handwritten 7,6\na handwritten 0,7\n"


def random_inception_file(path: Path, seed: int = 0) -> Path:
    """The FID Inception with random weights (and the file's unused 1008-way classifier), as .safetensors;
    convolutions He-normal so the pool features keep a spread (torch's default init shrinks them to ~1e-8)."""
    import torch
    from safetensors.torch import save_file

    from ldm.evaluation.fid import FIDInception
    torch.manual_seed(seed)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, (2.0 / m.weight[0].numel()) ** 0.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    save_file(state, str(path))
    return path


def stand_in_distance(mu1, s1, mu2, s2) -> float:
    """The Fréchet distance without its cross term Tr 2 (S1 S2)^1/2: a 2048-d sqrtm takes over a minute on this
    machine (the distance itself: test_frechet_distance_of_hand_made_gaussians, tests/test_fid_reference.py)."""
    import numpy as np
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2))


@pytest.fixture(scope="module")
def prompt_set_run(toy_run, tmp_path_factory):
    """The reduced toy run with quality.prompts_csv: three prompts with their seeds, a folder of four "real" images
    as the FID reference, a tiny random CLIP, a random FID Inception. Run on a copy of toy_run's output folder: its
    trainings and generations are reused (their keys do not involve the quality section)."""
    import shutil

    import numpy as np
    import torch
    from PIL import Image

    from ldm.evaluation import fid
    from test_metrics import make_tiny_clip
    path, bench = toy_run
    tmp = tmp_path_factory.mktemp("prompt_set")
    shutil.copytree(bench.out, tmp / "out")
    (tmp / "coco.csv").write_text(PROMPT_CSV)
    rng = np.random.default_rng(0)
    (tmp / "real").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "real" / f"{i:012d}.png")
    raw = yaml.safe_load(path.read_text())
    raw["output_dir"] = str(tmp / "out")
    torch.manual_seed(2)  # a tiny CLIP whose cosines with these prompts and images are positive (scores > 0)
    raw["quality"] = {**raw["quality"], "clip_model": str(make_tiny_clip(tmp / "clip")),
                      "inception_weights": str(random_inception_file(tmp / "inception.safetensors")),
                      "prompts_csv": str(tmp / "coco.csv"), "prompts_reference_images": str(tmp / "real")}
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    fid.load_inception.cache_clear()
    prompt_bench = B.Benchmark(B.load_spec(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid, "frechet_distance", stand_in_distance)
        prompt_bench.run()
    return spec, prompt_bench


def test_prompt_set_is_generated_per_model_and_scored_in_the_quality_table(prompt_set_run):
    """One image per CSV row with the row's seed (generate_images_nsfw.py) for the base model and UnGuide's three
    adapter; the quality table's prompt-set cells are the CLIP score against each row's prompt (recomputed with
    CLIPModel.forward) and the FID against the reference folder (recomputed from the image files)."""
    import csv

    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from ldm.evaluation import fid
    spec, bench = prompt_set_run
    log = [json.loads(line) for line in (bench.out / "benchmark_log.jsonl").read_text().splitlines()]
    this_run = log[-len(bench.stages):]
    ran = {e["stage"] for e in this_run if e["action"] == "ran"}
    assert ran == {"generate coco.csv / base", "generate coco.csv / UnGuide (three)", "score coco.csv / base",
                   "score coco.csv / UnGuide (three)", "judge three / base", "judge three / UnGuide"}  # CLIP added
    assert {e["kind"] for e in this_run if e["action"] == "reused"} == {"train", "generate"}
    q = bench.spec.quality
    rows = {r["method"]: r for r in csv.DictReader((bench.out / "tables" / "quality.csv").open())}
    assert list(rows) == ["base", "UnGuide"]
    model = CLIPModel.from_pretrained(q["clip_model"], local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(q["clip_model"], local_files_only=True)
    prompts = ["a handwritten 1", "a handwritten 7", "a handwritten 0"]
    for key in (("base", None), ("UnGuide", "three")):
        folder = bench.image_folder(bench.prompt_generations[key])
        files = sorted(folder.glob("*.jpg"))
        assert [f.name for f in files] == ["00000.jpg", "00001.jpg", "00002.jpg"]
        decisions = list(csv.DictReader((folder.parents[1] / "logs" / folder.name / "decisions.csv").open()))
        assert [(r["prompt"], r["seed"]) for r in decisions] == list(zip(prompts, ["5", "6", "7"]))
        ims = [Image.open(f).convert("RGB") for f in files]
        with torch.no_grad():
            out = model(**proc(text=prompts, images=ims, return_tensors="pt", padding=True))
        clip = (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).mean().item()
        net = fid.load_inception(q["inception_weights"])
        want_fid = stand_in_distance(*fid.statistics(fid.features(net, files)),
                                     *fid.statistics(fid.features(net, sorted((spec.parent / "real").glob("*")))))
        rec = json.loads(bench.prompt_scores[key].record.read_text())
        assert clip > 1 and want_fid > 1  # not a degenerate network: the comparisons below can tell
        assert rec["images"] == 3 and rec["clip_score"] == pytest.approx(clip, abs=1e-3)
        assert rec["fid"] == pytest.approx(want_fid, rel=1e-6)
        row = rows[key[0]]
        assert float(row["CLIP score (prompts_csv)"]) == pytest.approx(clip, abs=0.006)  # the cell: 2 decimals
        assert float(row["FID (prompts_csv)"]) == pytest.approx(want_fid, abs=0.006)
    assert rows["UnGuide"]["FID (others)"] == "not computed: no quality.reference_images"
    assert float(rows["UnGuide"]["LPIPS vs base (others)"]) > 0  # the other columns as before
    per_model = list(csv.DictReader((bench.out / "tables" / "quality_prompts.csv").open()))
    assert [(r["method"], r["erased concept"], r["images"]) for r in per_model] == [
        ("base", "- (the base model)", "3"), ("UnGuide", "three", "3")]
    text = (bench.out / "results.md").read_text()
    assert "prompts_csv: coco.csv (3 usable)" in text and "Quality on coco.csv (each model)" in text


def test_prompt_set_rerun_redoes_nothing_and_a_killed_generation_resumes(prompt_set_run, monkeypatch, capfd):
    """A rerun runs nothing; with one image and the records after it gone (as if killed there), only that row is
    generated again (the same picture: its seed is the row's) and only that model's scores are recomputed."""
    from ldm.evaluation import fid
    spec, bench = prompt_set_run
    monkeypatch.setattr(fid, "frechet_distance", stand_in_distance)
    log = bench.out / "benchmark_log.jsonl"
    n = len(log.read_text().splitlines())
    rerun = B.Benchmark(B.load_spec(spec))
    monkeypatch.setattr(rerun, "run_script", lambda *a, **k: pytest.fail(f"a script ran again: {a}"))
    rerun.run()
    second = [json.loads(line) for line in log.read_text().splitlines()][n:]
    assert {e["action"] for e in second} == {"reused"} and len(second) == len(rerun.stages)

    gen, score = bench.prompt_generations[("UnGuide", "three")], bench.prompt_scores[("UnGuide", "three")]
    image = bench.image_folder(gen) / "00001.jpg"
    before, fid_before = image.read_bytes(), json.loads(score.record.read_text())["fid"]
    image.unlink()
    gen.record.unlink()
    score.record.unlink()
    n = len(log.read_text().splitlines())
    capfd.readouterr()
    B.Benchmark(B.load_spec(spec)).run()
    out = capfd.readouterr().out
    assert "3 rows, 2 done, 1 to do" in out
    third = [json.loads(line) for line in log.read_text().splitlines()][n:]
    assert [e["stage"] for e in third if e["action"] == "ran"] == ["generate coco.csv / UnGuide (three)",
                                                                   "score coco.csv / UnGuide (three)"]
    assert image.read_bytes() == before
    assert json.loads(score.record.read_text())["fid"] == pytest.approx(fid_before, rel=1e-9)


# ------------------------------------------------------------------------------------------ FID

def test_frechet_distance_of_hand_made_gaussians():
    import numpy as np

    from ldm.evaluation.fid import frechet_distance
    # diagonal covariances: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    assert frechet_distance(np.array([0.0, 1.0]), np.diag([1.0, 4.0]), np.array([1.0, 1.0]),
                            np.diag([4.0, 1.0])) == pytest.approx(1 + 1 + 1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    cov = np.cov(a, rowvar=False)
    assert frechet_distance(a.mean(0), cov, a.mean(0), cov) == pytest.approx(0.0, abs=1e-6)


def test_inception_weights_load_from_a_local_file_and_bad_files_are_one_line(tmp_path):
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from ldm.evaluation import fid
    net = fid.FIDInception()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # the file's classifier
    save_file(state, str(tmp_path / "inception.safetensors"))
    loaded = fid.load_inception(str(tmp_path / "inception.safetensors"))
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight)
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    feats = fid.features(loaded, [tmp_path / "0.png", tmp_path / "1.png"])
    assert feats.shape == (2, 2048)
    del state["Mixed_5b.branch1x1.conv.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match="not the FID Inception weights: 1 missing"):
        fid.load_inception(str(tmp_path / "broken.safetensors"))
