"""The benchmark's tables and grids from its finished stages' records (ldm/evaluation/benchmark.py).

Writes into the benchmark's output folder:
    results.md                 every table, its protocol under it, the grids' paths
    tables/<name>.md / .csv    object, nudity, quality, quality_prompts (quality.prompts_csv: each model),
                               robustness, cost (those the spec asks for)
    grids/<concept>.png        rows: the concept's prompts; columns: the methods; a cell: the first four images
                               (seeds seed .. seed + 3) tiled 2 x 2, upscaled (nearest) so 16 px digits read
Tables are rebuilt from the records on every run (cheap); nothing here runs a model but the optional FID and LPIPS
networks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.evaluation.common import atomic_write_text, decode_image, list_images, read_jsonl
from ldm.evaluation.judges import intended_label, judge_protocol
from ldm.evaluation.tables import nudenet_counts, nudenet_table, object_row, object_table, simple_table
from ldm.images import image_grid, save_image
from ldm.runs import read_json

NOT_COMPUTED = "not computed"


def sampling_protocol(bench) -> str:
    s, spec = bench.spec.sampling, bench.spec
    n = s["images_per_prompt"]
    return (f"Protocol: spec `{spec.path.name}` (saved as {bench.out.name}/spec{spec.path.suffix}); model "
            f"{Path(spec.model['ckpt']).name}; {n} images per prompt (seeds {s['seed']}..{s['seed'] + n - 1}), DDIM "
            f"{s['steps']} steps, CFG {s['guidance']}, {s['protocol']} protocol; UnGuide's stability test on the fly: "
            f"t_enc {s['t_enc']}, {s['repeats']} draws of d(p); decisions per method as listed in the spec "
            f"(w1 / w2 / rule / threshold: " + "; ".join(f"{m.name} {m.w1:g} / {m.w2:g} / {m.decision} / "
                                                           f"{_num(m.threshold)}" for m in spec.methods) + ").")


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _per_prompt(bench, mname: str, cname: str) -> dict | None:
    st = bench.judged.get((mname, cname))
    return read_json(st.record)["per_prompt"] if st and st.done() else None


def object_rows(bench) -> list:
    rows = []
    for c in bench.spec.concepts:
        label_of = intended_label(bench.spec.judge, c)
        for m in bench.spec.methods:
            pp = _per_prompt(bench, m.name, c.name)
            if pp is not None:
                rows.append(object_row(c.name, m.name, pp, c.groups(), label_of))
    return rows


def _pairs(a: Path, b: Path):
    """(image of a, image of b) as uint8 arrays, for the images both folders hold under the same name (the same
    seed) with the same size."""
    names = {p.relative_to(a).as_posix() for p in list_images(a)} & {p.relative_to(b).as_posix() for p in
                                                                      list_images(b)}
    for n in sorted(names):
        x, _ = decode_image(a / n)
        y, _ = decode_image(b / n)
        if x is not None and y is not None and x.shape == y.shape:
            yield x, y


def _mean_abs_change(a: Path, b: Path) -> tuple[float, int] | None:
    """Mean |pixel a - pixel b| (0..255) over the images both folders hold under the same name (same seeds)."""
    diffs = [float(np.abs(x.astype(np.float64) - y.astype(np.float64)).mean()) for x, y in _pairs(a, b)]
    return (sum(diffs) / len(diffs), len(diffs)) if diffs else None


def _mean_lpips(a: Path, b: Path, model, batch: int = 16) -> tuple[float, int] | None:
    """Mean LPIPS(image a, image b) over the same pairs as _mean_abs_change (ldm/evaluation/lpips.py)."""
    import torch

    from ldm.evaluation.lpips import distance
    pairs = list(_pairs(a, b))
    values: list[float] = []
    i = 0
    while i < len(pairs):  # batches of pairs of one size
        j = i + 1
        while j < len(pairs) and j - i < batch and pairs[j][0].shape == pairs[i][0].shape:
            j += 1
        x0, x1 = (torch.from_numpy(np.stack([p[k] for p in pairs[i:j]])).permute(0, 3, 1, 2).float() / 255.0
                  for k in (0, 1))
        values += distance(model, x0, x1).tolist()
        i = j
    return (sum(values) / len(values), len(values)) if values else None


def _prompt_folder(gen_stage, prompt: str) -> Path:
    folders = read_json(gen_stage.folder / "decisions.json", "decisions record")["prompts"]
    return gen_stage.folder / "images" / folders[prompt]["folder"]


QUALITY_HEADER = ["method", "CLIP score", "pixel change vs base (others)", "LPIPS vs base (others)", "FID (others)"]
PROMPT_SET_HEADER = ["CLIP score (prompts_csv)", "FID (prompts_csv)"]


def prompt_set_records(bench) -> dict[str, list[tuple[str | None, dict]]]:
    """quality.prompts_csv: method -> [(erased concept or None for the base model, its finished score record)]."""
    out: dict[str, list] = {}
    for (mname, cname), st in bench.prompt_scores.items():
        if st.done():
            out.setdefault(mname, []).append((cname, read_json(st.record)))
    return out


def _prompt_set_cells(bench, recs: list[tuple[str | None, dict]]) -> list[str]:
    """[CLIP score, FID] of a method on the prompt set: the mean over its models (one per erased concept)."""
    q = bench.spec.quality
    if not recs:
        return ["-", "-"]
    clips = [r["clip_score"] for _, r in recs if r.get("clip_score") is not None]
    fids = [r["fid"] for _, r in recs if r.get("fid") is not None]
    clip = f"{sum(clips) / len(clips):.2f}" if clips else (
        f"{NOT_COMPUTED}: no quality.clip_model" if not (q.get("clip_model") or bench.spec.judge.get("clip_model"))
        else "-")
    if "inception_weights" not in q:
        fid = f"{NOT_COMPUTED}: no quality.inception_weights"
    elif all(r.get("fid_reference") == "itself" for _, r in recs):
        fid = "0 (the reference)"
    else:
        fid = f"{sum(fids) / len(fids):.2f}" if fids else "-"
    return [clip, fid]


def prompt_set_text(bench) -> str:
    """The prompt set's protocol, under the quality tables."""
    q, s = bench.spec.quality, bench.spec.sampling
    ref = q.get("prompts_reference_images")
    ref_text = ("the base model's images of the same rows" if ref == "base" else f"the images under {ref}")
    return (f"prompts_csv: {Path(q['prompts_csv']).name}" + (f", its first {q['limit']} rows" if q["limit"] else "")
            + f" ({q['prompt_rows']} usable), one image per row with the row's evaluation_seed (default: its index) "
            "and evaluation_guidance (default 7.5; not sampling.guidance), generate_images_nsfw.py with DDIM "
            f"{s['steps']} steps and the stability test of each method's decision rule (t_enc {s['t_enc']}, at most "
            f"{s['repeats']} draws); a method's model per erased concept of quality.concepts "
            f"({', '.join(q['concepts'])}; the base model once), its cells the mean over those models "
            "(tables/quality_prompts: each model); CLIP score against the row's prompt"
            + (f"; FID against {ref_text}" if "inception_weights" in q else "") + ".")


def quality_rows(bench) -> tuple[list[list], str]:
    """Per method: CLIP score (all prompts), mean pixel change and mean LPIPS to the base model's images of the
    other prompts (paired: same prompt, same seed), FID of the other prompts' images against the reference; with
    quality.prompts_csv, the CLIP score and FID of the prompt set's images (two more columns)."""
    spec = bench.spec
    prompt_set = prompt_set_records(bench) if spec.quality.get("prompts_csv") else None
    base = next((m for m in spec.methods if not m.has_adapter), None)
    clip_model = spec.quality.get("clip_model") or spec.judge.get("clip_model")
    fid_ready = "inception_weights" in spec.quality and "reference_images" in spec.quality
    lpips_model = _lpips_model(bench) if "lpips_weights" in spec.quality else None
    rows = []
    for m in spec.methods:
        scores, changes, n_change, dists, n_dist = [], [], 0, [], 0
        others: list[Path] = []
        for c in spec.concepts:
            g = bench.generations.get((m.name, c.name))
            pp = _per_prompt(bench, m.name, c.name)
            if g is None or pp is None:
                continue
            scores += [v["clip_score"] for v in pp.values() if v.get("clip_score") is not None]
            base_gen = bench.generations.get((base.name, c.name)) if base is not None else None
            for p in c.groups()["others"]:
                others.append(_prompt_folder(g, p))
                if m is not base and base_gen is not None and base_gen.done():
                    mine, theirs = _prompt_folder(g, p), _prompt_folder(base_gen, p)
                    r = _mean_abs_change(mine, theirs)
                    if r:
                        changes.append(r[0] * r[1])
                        n_change += r[1]
                    r = _mean_lpips(mine, theirs, lpips_model) if lpips_model is not None else None
                    if r:
                        dists.append(r[0] * r[1])
                        n_dist += r[1]
        extra = _prompt_set_cells(bench, prompt_set.get(m.name, [])) if prompt_set is not None else []
        if not others:
            if prompt_set and m.name in prompt_set:  # a method of no object concept (e.g. nudity only)
                rows.append([m.name, "-", "-", "-", "-", *extra])
            continue
        clip = f"{sum(scores) / len(scores):.2f}" if scores else f"{NOT_COMPUTED}: no quality.clip_model"
        change = ("0 (the base model)" if m is base else f"{sum(changes) / n_change:.2f}" if n_change else "-")
        lpips = (f"{NOT_COMPUTED}: no quality.lpips_weights" if lpips_model is None else "0 (the base model)"
                 if m is base else f"{sum(dists) / n_dist:.4g}" if n_dist else "-")
        fid = f"{NOT_COMPUTED}: no quality.inception_weights" if "inception_weights" not in spec.quality else \
            f"{NOT_COMPUTED}: no quality.reference_images"
        if fid_ready:
            fid = f"{_fid(bench, m, base, others):.2f}"
        rows.append([m.name, clip, change, lpips, fid, *extra])
    lpips_text = (f"LPIPS: lpips v0.1 ({spec.quality['lpips_net']}) distance of each of those images to the base "
                  "model's image of the same prompt and seed, averaged over the pairs (ldm/evaluation/lpips.py; "
                  "images under 64 px upsampled bilinearly to 64)" if lpips_model is not None else
                  "LPIPS: not computed (no quality.lpips_weights)")
    text = ("CLIP score: 100 * max(cos(image, its prompt), 0) over every prompt's images"
            + (f" (local CLIP {Path(clip_model).name})" if clip_model else "") + "; pixel change: mean |image - base "
            "model's image| (0..255) over the other prompts' images with the same seeds (what an erasure does to "
            f"what it should leave alone); {lpips_text}; FID: the other prompts' images against "
            + (f"{spec.quality.get('reference_images')}" if fid_ready else "the reference images")
            + " (Fréchet distance of Inception pool features; ldm/evaluation/fid.py).")
    if prompt_set is not None:
        text += " " + prompt_set_text(bench)
    return rows, text


def prompt_set_rows(bench) -> list[list]:
    """tables/quality_prompts: one row per model that drew the prompt set (method, erased concept)."""
    rows = []
    recs = prompt_set_records(bench)
    for m in bench.spec.methods:
        for cname, rec in recs.get(m.name, []):
            rows.append([m.name, cname or "- (the base model)", rec["images"],
                         *_prompt_set_cells(bench, [(cname, rec)])])
    return rows


def _lpips_model(bench):
    import torch

    from ldm.evaluation.lpips import load_lpips
    q, dev = bench.spec.quality, bench.device()
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if dev in ("auto", None) else dev
    return load_lpips(q["lpips_weights"], q["lpips_net"], device=dev)


def _fid(bench, m, base, others: list[Path]) -> float:
    from ldm.evaluation.fid import fid_of_folders
    q = bench.spec.quality
    if q["reference_images"] == "base":
        if base is None:
            raise ValueError("quality.reference_images 'base' needs a base-model method")
        ref = [_prompt_folder(bench.generations[(base.name, c.name)], p) for c in bench.spec.concepts
               for p in c.groups()["others"] if (base.name, c.name) in bench.generations]
    else:
        ref = [Path(q["reference_images"])]
    return fid_of_folders(others, ref, q["inception_weights"], device=bench.device())


def cost_rows(bench) -> list[list]:
    rows = []
    for c in bench.spec.concepts:
        for m in bench.spec.methods:
            g = bench.generations.get((m.name, c.name))
            if g is None or not g.done():
                continue
            train_s, mem = "-", "-"
            t = bench.trainings.get((m.name, c.name))
            if t is not None and (t.folder / "train_config.json").is_file():
                rec = read_json(t.folder / "train_config.json")
                if rec.get("seconds_per_iteration") and rec.get("iterations_done"):
                    train_s = f"{rec['seconds_per_iteration'] * rec['iterations_done']:.0f}"
                mem = f"{rec.get('peak_memory_gib')} ({rec.get('peak_memory_kind', '')})"
            rec = read_json(g.record)
            # per image, from each rank's run (sharded ranks share one run_summary.json: ratios, not sums)
            runs = [r["run_summary"] for r in rec.get("ranks", [rec]) if r["run_summary"]["images"]]
            evals = [s["unet_evals"] / s["images"] for s in runs]
            secs = [s["seconds"] / s["images"] for s in runs]
            rows.append([c.name, m.name, train_s, mem, f"{sum(evals) / len(evals):.0f}" if runs else "- (reused)",
                         f"{sum(secs) / len(secs):.3f}" if runs else "-",
                         len(c.prompts()) * bench.spec.sampling["images_per_prompt"]])
    return rows


def robustness_rows(bench) -> list[list]:
    rows = []
    for a, mname, cname, st in bench.attack_stages:
        files = sorted((st.folder / "rows").glob("*.json")) if st.done() else []
        rs = [json.loads(p.read_text(encoding="utf-8")) for p in files]
        if not rs:
            continue
        n = len(rs)
        before = sum(r["success_before"] for r in rs) / n
        after = sum(r["success_after"] for r in rs) / n
        rows.append([cname, a["attack"], mname, f"{100 * before:.1f}", f"{100 * after:.1f}", n,
                     f"{sum(r['unet_evals'] for r in rs) / n:.0f}", f"{sum(r['seconds'] for r in rs) / n:.1f}"])
    return rows


def nudity_per_method(bench) -> dict:
    out = {}
    for mname, st in bench.i2p_stages.items():
        path = st.folder / "nudenet" / "detections.jsonl"
        if st.done() and path.is_file():
            records, _ = read_jsonl(path)
            out[mname] = nudenet_counts(records, bench.spec.i2p["threshold"])
    return out


def grid(bench, concept) -> Image.Image | None:
    """Rows: the concept's prompts; columns: methods; a cell: the first four images tiled 2 x 2."""
    cols = [m for m in bench.spec.methods if (m.name, concept.name) in bench.generations
            and bench.generations[(m.name, concept.name)].done()]
    if not cols:
        return None
    rows = []
    for p in concept.prompts():
        row = []
        for m in cols:
            folder = _prompt_folder(bench.generations[(m.name, concept.name)], p)
            ims = [Image.open(f).convert("RGB") for f in sorted(folder.glob("[0-9]*.jpg"))[:4]]
            size = ims[0].width
            gap = max(1, size // 16)  # a white line between the four samples
            cell = Image.new("RGB", (2 * size + gap, 2 * size + gap), "white")
            for i, im in enumerate(ims):
                cell.paste(im, ((i % 2) * (size + gap), (i // 2) * (size + gap)))
            row.append(cell)
        rows.append(row)
    return image_grid(rows, row_labels=concept.prompts(), col_labels=[m.name for m in cols], cell=96)


def write_report(bench) -> str:
    """Write every table the finished stages allow, the grids and results.md; returns results.md's text."""
    spec, out = bench.spec, bench.out
    protocol = sampling_protocol(bench)
    sections = [f"# Benchmark `{spec.name}`\n"]

    def emit(name: str, title: str, md: str, csv: str) -> None:
        atomic_write_text(out / "tables" / f"{name}.md", md)
        atomic_write_text(out / "tables" / f"{name}.csv", csv)
        sections.append(f"## {title}\n\n{md}")

    rows = object_rows(bench)
    if rows:
        md, csv = object_table(rows, [m.name for m in spec.methods],
                               protocol + " " + judge_protocol(spec.judge) + ".")
        emit("object", "Object erasure", md, csv)
    nud = nudity_per_method(bench)
    if nud:
        i = spec.i2p
        p = (f"Protocol: I2P prompts {Path(i['csv']).name}" + (f" (first {i['limit']} rows)" if i["limit"] else "")
             + f", one image per row with the row's evaluation_seed and guidance, DDIM {i['ddim_steps']}; stability "
             f"test t_enc {i['t_enc']}, at most {i['repeats']} draws; NudeNet "
             f"{__import__('ldm.evaluation.nudity', fromlist=['x']).nudenet_version()} (bundled 320n detector); a "
             f"detection counts when its score >= {i['threshold']} (classes <NAME>_EXPOSED; counts are boxes summed "
             "over images). NudeNet 3.x reports no detection below its own 0.2 score floor, so thresholds under 0.2 "
             "are not measurable and are refused; at 0.6 the floor changes nothing.")
        md, csv = nudenet_table(nud, p)
        emit("nudity", "I2P nudity (NudeNet detections)", md, csv)
    qrows, qtext = quality_rows(bench)
    if qrows:
        header = QUALITY_HEADER + (PROMPT_SET_HEADER if spec.quality.get("prompts_csv") else [])
        md, csv = simple_table(header, qrows, qtext + " " + protocol)
        emit("quality", "Quality", md, csv)
    prows = prompt_set_rows(bench) if spec.quality.get("prompts_csv") else []
    if prows:
        md, csv = simple_table(["method", "erased concept", "images", "CLIP score", "FID"], prows,
                               prompt_set_text(bench) + " " + protocol)
        emit("quality_prompts", f"Quality on {Path(spec.quality['prompts_csv']).name} (each model)", md, csv)
    rrows = robustness_rows(bench)
    if rrows:
        md, csv = simple_table(["concept", "attack", "method", "ASR before %", "ASR after %", "pairs",
                                "UNet evals / pair", "s / pair"], rrows,
                               "ASR: share of (prompt, seed) pairs of the target and synonyms whose defended image "
                               "the judge reads as the concept, before and after the attack (attack.py; options as in "
                               "the spec). " + judge_protocol(spec.judge) + ". " + protocol)
        emit("robustness", "Robustness (attack.py)", md, csv)
    crows = cost_rows(bench)
    if crows:
        md, csv = simple_table(["concept", "method", "training s", "training peak memory GiB",
                                "UNet sample-evaluations / image", "sampling s / image", "images"], crows,
                               "Training: train.py's record (seconds of the iterations, peak memory: CUDA max "
                               "allocated or the CPU process's peak RSS). UNet sample-evaluations per image: "
                               "generate_images.py's count (the stability test and sampling together) over the images "
                               "its run made (a run resumed after a kill repeats the stability test); seconds "
                               "include the stability test, per process. "
                               f"Device {spec.run['device']}, threads {spec.run['threads']}. " + protocol)
        emit("cost", "Cost", md, csv)
    grids = []
    for c in spec.concepts:
        g = grid(bench, c)
        if g is not None:
            path = out / "grids" / f"{c.name}.png"
            save_image(g, path)
            grids.append(path)
    if grids:
        sections.append("## Grids\n\nRows: the concept's prompts (target, synonyms, others); columns: methods; a cell: "
                        "the first four images (seeds of idx 0-3) tiled 2 x 2, upscaled.\n\n"
                        + "\n".join(f"![{p.stem}](grids/{p.name})" for p in grids) + "\n")
    text = "\n".join(sections)
    atomic_write_text(out / "results.md", text)
    print(text)
    print(f"[benchmark] wrote {out / 'results.md'}, {out / 'tables'}/ and {len(grids)} grid(s)")
    return text
