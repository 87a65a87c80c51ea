"""Adversarial erasure training (ldm/erasure/adversarial.py, train.py --adv_*) on the tiny model. CPU, offline."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from ldm.erasure.adversarial import Adversary, AdversarySettings
from ldm.erasure.lora import lora_parameters
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from test_train import adapted, adapter, args, base, ckpt, run_dir, same, train_main, _interrupt_at  # noqa: F401

CAT, FOREST = "a photo of the cat", "a photo of the forest"


def adversary(model, **kw) -> Adversary:
    s = AdversarySettings(**{"every": 2, "steps": 3, "images": 2, "batch": 2, **kw})
    return Adversary(model, CAT, model.latent_shape(16), 4, s, seed=0)


def test_adversarial_term_is_beta_times_the_attackers_contexts_erasure_error(base):
    """loss with the attacker = the plain loss (the same draws: the attacker has its own generator) + beta * MSE of
    the adapted model at c_adv against the erasure target e_0 - eta (e_p - e_0), at the same z and t."""
    model = adapted(base, b_scale=0.05)
    shape, emb = model.latent_shape(16), encode_prompts(model, CAT, FOREST)
    plain = UnGuideObjective(model, emb, shape, ddim_steps=5)
    adv = UnGuideObjective(model, emb, shape, ddim_steps=5, adversary=adversary(model, weight=0.5))
    l0, plan0 = plain.loss(torch.Generator().manual_seed(5))
    l1, plan1 = adv.loss(torch.Generator().manual_seed(5))
    assert (plan0.t_enc, plan0.t) == (plan1.t_enc, plan1.t)
    c_adv = adv.adversary._context                                              # [1, 77, D]
    assert c_adv.shape == emb.target.shape and not torch.allclose(c_adv, emb.target)
    z, t = plain.partial_latent(plan0), torch.full((1,), plan0.t, dtype=torch.long)
    frozen = copy.deepcopy(base)
    with torch.no_grad():
        e_0, e_p = frozen.apply_model(z, t, emb.reference), frozen.apply_model(z, t, emb.target)
        term = F.mse_loss(model.apply_model(z, t, c_adv), e_0 - 2.0 * (e_p - e_0))
    assert float(term) > 1e-8
    assert abs(float((l1 - l0).detach()) - 0.5 * float(term)) <= 1e-5 * float(term) + 1e-9
    l1.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model.unet))


def test_the_attacker_searches_every_few_iterations_with_frozen_weights_and_typeable_words(base):
    """A search every `every` contexts (warm start from the last tokens), none in between; the adapters' weights
    neither change nor collect gradients in it; its prompt is whole words in front of the target that replay."""
    model = adapted(base, b_scale=0.05)
    a = adversary(model, every=3, steps=4)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    searches = []
    real = a.search
    a.search = lambda: (searches.append(a.calls), real())
    contexts = [a.context() for _ in range(7)]
    assert searches == [0, 3, 6]
    assert torch.equal(contexts[0], contexts[1]) and torch.equal(contexts[1], contexts[2])
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert all(p.grad is None for p in lora_parameters(model.unet)) and all(p.requires_grad
                                                                          for p in lora_parameters(model.unet))
    assert a.last["text"].endswith(CAT) and len(a.last["text"].split()) == len(CAT.split()) + 3
    assert a.space.round_trips(a.space.ids[a.idx], CAT)


@pytest.mark.parametrize("decision_weight", [0.0, 0.5])
def test_the_attack_step_lowers_the_attackers_loss(base, decision_weight):
    """The search does its job: on fixed draws, the found words score a lower attack loss (the adapted model
    denoises the concept's latents better; with the decision term, also a smaller d(p)) than the words it started
    from (summed over several starts: one start may not move)."""
    model = adapted(base, b_scale=0.05)
    gains = []
    for seed in range(4):
        a = adversary(model, steps=12, lr=1.0, decision_weight=decision_weight, t_enc=2)
        assert (a.t_range is None) == (decision_weight == 0)
        a.generator.manual_seed(100 + seed)
        a.idx = torch.randint(0, len(a.space.ids), (3,), generator=a.generator)

        def fixed_loss(idx):
            from ldm.attacks.unlearndiffatk import encode
            state = a.generator.get_state()
            a.generator.manual_seed(7)
            with torch.no_grad():
                value = sum(float(a.attack_loss(encode(a.space, idx, None, CAT), torch.tensor([0, 1])))
                            for _ in range(8))
            a.generator.set_state(state)
            return value
        start = fixed_loss(a.idx)
        a.search()
        gains.append(start - fixed_loss(a.idx))
    assert sum(gains) > 0, gains


def test_adversarial_training_resumes_exactly_and_names_its_run(ckpt, tmp_path, monkeypatch, capsys):
    """train.py --adv_every: a run interrupted between two searches and resumed gives the uninterrupted run's
    adapter bit for bit (the attacker's tokens and generator are in state.pt); the folder and train_config.json
    say it was adversarial."""
    adv = ["--adv_every", "2", "--adv_steps", "2", "--adv_images", "2", "--save_every", "3"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main(args(ckpt, whole, *adv, iterations=8))[0] == 0
    _interrupt_at(monkeypatch, 5)
    code, _ = train_main(args(ckpt, cut, *adv, iterations=8), capsys)
    assert code == 130
    monkeypatch.undo()
    assert train_main(args(ckpt, cut, *adv, "--resume", iterations=8))[0] == 0
    final = run_dir(cut) / "models" / "lora.safetensors"
    assert same(adapter(final), adapter(run_dir(whole) / "models" / "lora.safetensors"))
    assert run_dir(whole).name.endswith("_adversarial_3x2")
    cfg = json.loads((run_dir(whole) / "train_config.json").read_text())
    assert cfg["adversarial"]["every"] == 2 and cfg["adversarial"]["tokens"] == 3
    assert cfg["adversary_last"]["text"].endswith("a photo of the cat")  # the attacker's last words, on record
    from ldm.erasure.settings import TrainSettings
    esd = TrainSettings(None, None, [], 1e-5, CAT, "", 4, "standard", 16, 3.0, 1.0, 0.0, None, 0, None, None,
                        method="esd", train_method="xattn", adversarial=cfg["adversarial"], erase_also=["a kitten"])
    assert esd.run_name().endswith("_adversarial_3x2_synonyms_1")  # any ESD-objective method names its options
    plain = tmp_path / "plain"
    assert train_main(args(ckpt, plain, iterations=8))[0] == 0
    assert not same(adapter(run_dir(plain) / "models" / "lora.safetensors"), adapter(final))


@pytest.mark.parametrize("extra, want", [(["--adv_every", "-1"], "--adv_every -1"),
                                         (["--adv_every", "2", "--method", "sepce"], "--adv_every"),
                                         (["--adv_every", "2", "--adv_tokens", "0"], "--adv_tokens"),
                                         (["--adv_every", "2", "--adv_decision_weight", "-1"], "decision_weight")])
def test_bad_adversarial_flags_are_one_line(extra, want, ckpt, tmp_path, capsys):
    code, err = train_main(args(ckpt, tmp_path / "out", *extra, iterations=2), capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("erasing ")]
    assert code == 2 and len(lines) == 1 and want in lines[0], err
