"""Output folders keyed by what made them (ldm/runs.py) and the generation scripts' collisions (issue 15): another
adapter, other settings or other base weights in the same --output_dir are refused; a rerun may add prompts
without mixing two prompts' images; the same adapter under other bytes is refused; one process per folder."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import generate_images
import generate_images_nsfw
from helpers_model import REPO, TINY, check_peak_memory, random_adapter_file, save_checkpoint, tiny_checkpoint
from ldm.cli import run
from ldm.errors import UserError
from ldm.prompts import extend_class_dirs
from ldm.runs import check_run_config, folder_lock, model_fingerprint, shard, tensors_fingerprint

STEPS, SIZE = 3, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    base, ckpt = tiny_checkpoint(d)
    other = copy.deepcopy(base)  # other base weights where the adapters do not sit (they would refuse it there)
    with torch.no_grad():
        other.unet.out[-1].weight.mul_(1.01)
    other_ckpt = save_checkpoint(other, d / "other.safetensors")
    return {"base": base, "ckpt": ckpt, "other_ckpt": other_ckpt, "dir": d,
            "a": random_adapter_file(base, d / "a.safetensors", 1), "b": random_adapter_file(base, d / "b.safetensors", 2)}


def gen_args(world, out, *extra, ckpt=None, lora="a"):
    return ["--config", str(TINY), "--ckpt", str(ckpt or world["ckpt"]), "--device", "cpu", "--output_dir", str(out),
            "--image_size", str(SIZE), "--steps", str(STEPS), "--samples", "1", "--w1", "0", "--w2", "0",
            *(["--lora", str(world[lora])] if lora else []), *extra]


def refused(argv, *names):
    with pytest.raises(SystemExit) as e:
        run(lambda: generate_images.main(argv))
    assert e.value.code == 2
    return e


def test_other_adapter_settings_or_weights_in_the_same_folder_are_refused(world, tmp_path, capsys):
    out = tmp_path / "run"
    generate_images.main(gen_args(world, out, "--prompt", "a photo of the cat"))
    assert len(list((out / "images").rglob("*.jpg"))) == 1
    cases = [gen_args(world, out, "--prompt", "a photo of the cat", lora="b"),                  # another adapter
             gen_args(world, out, "--prompt", "a photo of the cat", "--guidance", "3"),         # another CFG scale
             gen_args(world, out, "--prompt", "a photo of the cat", ckpt=world["other_ckpt"])]  # other weights
    for argv in cases:
        capsys.readouterr()
        refused(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0] and str(out) in err[0], err


def test_rerun_with_more_prompts_keeps_folders_and_never_mixes(world, tmp_path):
    out = tmp_path / "run"
    generate_images.main(gen_args(world, out, "--prompt", "一只猫"))
    first = json.loads((out / "decisions.json").read_text())["prompts"]
    generate_images.main(gen_args(world, out, "--prompt", "一只猫", "--prompt", "一只狗"))  # both slug to "prompt"
    both = json.loads((out / "decisions.json").read_text())["prompts"]
    assert both["一只猫"]["folder"] == first["一只猫"]["folder"]
    assert both["一只猫"]["folder"] != both["一只狗"]["folder"]
    assert sorted(p.parent.name for p in (out / "images").rglob("*.jpg")) == sorted(v["folder"] for v in both.values())
    assert both["一只狗"]["w"] == [0.0]


def test_extend_class_dirs_gives_unused_folders():
    known = {"a photo of the cat": "cat"}
    got = extend_class_dirs(known, ["a photo of the cat", "a drawing of a cat", "x cat"])
    assert got["a photo of the cat"] == "cat"
    assert len(set(got.values())) == 3


def test_output_dir_that_is_a_file_is_refused_before_sampling(world, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    refused(gen_args(world, target, "--prompt", "a cat"))
    assert "is not a folder" in capsys.readouterr().err


def test_same_adapter_under_other_bytes_is_refused(world, tmp_path, capsys):
    """A .pth copy of a .safetensors adapter (other bytes, same tensors) would double the erasure."""
    from ldm.erasure.io import read_adapter
    tensors, _ = read_adapter(world["a"])
    pth = tmp_path / "a_copy.pth"
    torch.save(tensors, pth)
    refused(gen_args(world, tmp_path / "o", "--prompt", "a cat", "--lora", str(world["a"]), str(pth), lora=None))
    assert "hold the same tensors" in capsys.readouterr().err


def test_peak_memory_record_and_format(monkeypatch):
    """ldm/memory.py, what every script with a timing summary records: the peak RSS on the CPU, CUDA's allocator
    maximum on CUDA; printed in GiB (MiB below 0.01 GiB)."""
    from ldm.memory import GIB, format_memory, memory_record, peak_memory
    rec = memory_record(torch.device("cpu"))
    assert set(rec) == {"peak_memory_bytes", "peak_memory_kind", "peak_memory_gib"}
    check_peak_memory(rec)
    assert peak_memory("cpu")[1] == peak_memory(None)[1] == "cpu_peak_rss"
    assert peak_memory("cpu")[0] >= rec["peak_memory_bytes"]            # a peak so far never goes down
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * GIB // 2)
    assert memory_record(torch.device("cuda:0")) == {"peak_memory_bytes": 3 * GIB // 2,
                                                    "peak_memory_kind": "cuda_max_allocated", "peak_memory_gib": 1.5}
    assert format_memory(memory_record("cuda")) == "1.50 GiB (cuda_max_allocated)"
    assert format_memory(int(0.93 * GIB), "cpu_peak_rss") == "0.93 GiB (cpu_peak_rss)"
    assert format_memory(5 * 2 ** 20, "cuda_max_allocated") == "5.0 MiB (cuda_max_allocated)"


def test_corrupt_run_record_is_named(tmp_path):
    (tmp_path / "run_config.json").write_text("{not json")
    with pytest.raises(UserError, match="run_config.json: not valid JSON"):
        check_run_config(tmp_path, {"a": 1})


def test_folder_lock_refuses_a_second_process(tmp_path):
    code = ("import sys; sys.path.insert(0, '.'); from ldm.runs import folder_lock; from ldm.errors import UserError\n"
            f"try:\n    with folder_lock(__import__('pathlib').Path({str(tmp_path)!r}), 0): pass\n"
            "except UserError as e:\n    print(e); sys.exit(2)\n")
    with folder_lock(tmp_path, 0):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "another process" in proc.stdout
        other_shard = subprocess.run([sys.executable, "-c", code.replace(", 0)", ", 1)")], cwd=REPO,
                                     capture_output=True, text=True, timeout=60)
        assert other_shard.returncode == 0  # another shard of the same folder may run
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0  # released


@pytest.mark.parametrize("rank, world_size", [("x", "2"), ("2", "2"), ("-1", "1"), ("0", "0")])
def test_bad_shard_variables(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(UserError, match="RANK"):
        shard()


def test_fingerprints_see_content_not_files(world):
    base = world["base"]
    assert model_fingerprint(base) == model_fingerprint(copy.deepcopy(base))
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.unet.out[-1].weight.mul_(1.001)
    assert model_fingerprint(base) != model_fingerprint(other)
    t = {"x": torch.arange(4.0)}
    assert tensors_fingerprint(t) == tensors_fingerprint({"x": torch.arange(4.0).double()})
    assert tensors_fingerprint(t) != tensors_fingerprint({"y": torch.arange(4.0)})


def test_nsfw_resume_refuses_other_base_weights(world, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text(",prompt,evaluation_seed,evaluation_guidance,case_number\n0,a cat,1,7.5,0\n1,a dog,2,7.5,1\n")
    argv = ["--csv_path", str(csv), "--output_dir", str(tmp_path / "exp"), "--lora", str(world["a"]),
            "--config", str(TINY), "--device", "cpu", "--image_size", str(SIZE), "--ddim_steps", str(STEPS),
            "--t_enc", "1", "--w1", "0", "--w2", "0", "--limit", "1"]
    generate_images_nsfw.main(argv + ["--ckpt", str(world["ckpt"])])
    other = argv[:-1] + ["2", "--ckpt", str(world["other_ckpt"])]  # one more row, but other base weights
    with pytest.raises(SystemExit) as e:
        run(lambda: generate_images_nsfw.main(other))
    assert e.value.code == 2 and "base" in capsys.readouterr().err


def nsfw_argv(world, tmp_path, *extra):
    csv = tmp_path / "p.csv"
    if not csv.is_file():
        csv.write_text(",prompt,evaluation_seed,evaluation_guidance,case_number\n0,a cat,1,7.5,0\n1,a dog,2,7.5,1\n"
                       "2,a bird,3,7.5,2\n")
    return ["--csv_path", str(csv), "--output_dir", str(tmp_path / "exp"), "--lora", str(world["a"]),
            "--config", str(TINY), "--ckpt", str(world["ckpt"]), "--device", "cpu", "--image_size", str(SIZE),
            "--ddim_steps", str(STEPS), "--t_enc", "1", "--repeats", "2", "--empty_draws", "2", *extra]


def test_crash_windows_are_redone_not_taken_for_done(world, tmp_path, capsys):
    """A torn last decisions line, an image cut short at its final name and a corrupt d(\"\") cache are redone."""
    argv = nsfw_argv(world, tmp_path, "--no_adaptive")
    generate_images_nsfw.main(argv)
    (log_dir,) = (tmp_path / "exp" / "logs").iterdir()
    (img_dir,) = (tmp_path / "exp" / "images").iterdir()
    shard_file = log_dir / "decisions.rank0.csv"
    lines = shard_file.read_text().splitlines()
    shard_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:12])      # the last row torn mid-line
    data = (img_dir / "00001.jpg").read_bytes()
    (img_dir / "00001.jpg").write_bytes(data[: len(data) // 3])                 # an image cut short
    (log_dir / "d_empty.json").write_text("{not json")                          # a corrupt cache
    before = {p.name: p.stat().st_mtime_ns for p in img_dir.glob("*.jpg")}
    capsys.readouterr()
    generate_images_nsfw.main(argv)
    out = capsys.readouterr()
    assert "1 done, 2 to do" in out.out and "not a valid d(\"\") record" in out.err
    after = {p.name: p.stat().st_mtime_ns for p in img_dir.glob("*.jpg")}
    assert after["00000.jpg"] == before["00000.jpg"] and after["00001.jpg"] != before["00001.jpg"]
    rows = (log_dir / "decisions.csv").read_text().splitlines()
    assert len(rows) == 4 and all(r.count(",") >= 11 for r in rows[1:])         # header + 3 complete rows


def test_merge_with_nothing_to_merge_is_one_line(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(lambda: generate_images_nsfw.main(nsfw_argv(world, tmp_path, "--merge")))
    assert e.value.code == 2 and "no decisions.rank*.csv" in capsys.readouterr().err


def test_folder_names_flag_and_experiment_mode_records(world, tmp_path):
    """--folder_names prompt names every folder after its whole prompt; experiment mode records its settings
    and decisions in the experiment folder, as explicit mode does."""
    out = tmp_path / "named"
    generate_images.main(gen_args(world, out, "--prompt", "a photo of the cat", "--folder_names", "prompt"))
    assert json.loads((out / "decisions.json").read_text())["prompts"]["a photo of the cat"]["folder"] == \
        "a_photo_of_the_cat"
    exp = tmp_path / "exps" / "e1"
    (exp / "models").mkdir(parents=True)
    (exp / "models" / "lora.safetensors").write_bytes(world["a"].read_bytes())
    pj = tmp_path / "p.json"
    pj.write_text(json.dumps({"target": "a photo of the cat", "other": ["a red car", ""]}))
    (exp / "train_config.json").write_text(json.dumps({"prompts_json": str(pj)}))
    argv = [a for a in gen_args(world, tmp_path / "exps", lora=None)]
    generate_images.main(argv)
    record = json.loads((exp / "decisions.json").read_text())["prompts"]
    assert set(record) == {"a photo of the cat", "a red car"} and record["a red car"]["w"] == [0.0]
    assert json.loads((exp / "run_config.json").read_text())["mode"] == "experiment"


@pytest.mark.parametrize("protocol", ["fast", "release"])
def test_a_rows_numbers_do_not_depend_on_its_batch_or_shard(world, tmp_path, monkeypatch, capsys, protocol):
    """Issue 15: decisions.csv's d_prompt, d_prompt_std, d_empty, w, repeats_used and unet_evals of a row are the
    same bytes (tolerance: none) in one process with 5 rows per batch and in two shards with 1 and 2 rows per
    batch; unet_evals is the row's own cost: with 1 row per batch its mean is the UNet counter's."""
    csv = tmp_path / "p.csv"
    csv.write_text(",prompt,evaluation_seed,evaluation_guidance,case_number\n" + "".join(
        f"{i},{p},{s},{g},{i}\n" for i, (p, s, g) in enumerate(
            [("a cat", 1, 7.5), ("a dog on a sofa", 2, 6), ("a bird", 1, 7.5), ("a nude painting", 9, 9), ("x", 5, 3)])))

    def argv(out, batch):
        return ["--csv_path", str(csv), "--output_dir", str(tmp_path / out), "--lora", str(world["a"]),
                "--config", str(TINY), "--ckpt", str(world["ckpt"]), "--device", "cpu", "--image_size", str(SIZE),
                "--ddim_steps", "4", "--t_enc", "1", "--repeats", "4", "--min_repeats", "2", "--empty_draws", "3",
                "--eval_budget", "0", "--protocol", protocol, "--batch_size", str(batch)]

    def table(out):
        (log,) = (tmp_path / out / "logs").iterdir()
        with open(log / "decisions.csv", newline="", encoding="utf-8") as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in __import__("csv").DictReader(f)]
    generate_images_nsfw.main(argv("one", 5))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, batch in ((0, 1), (1, 2)):
        monkeypatch.setenv("RANK", str(rank))
        capsys.readouterr()
        generate_images_nsfw.main(argv("two", batch))
        if rank == 0:
            said = capsys.readouterr().out
    one, two = table("one"), table("two")
    assert len(one) == 5 and one == two
    assert len({r["d_prompt_std"] for r in one}) > 1 and all(r["d_prompt_std"] for r in one)
    mine = [int(r["unet_evals"]) for r in one[0::2]]  # shard 0's rows, sampled one per batch
    assert f"{sum(mine) / len(mine):.0f} UNet sample-evaluations per prompt" in said
