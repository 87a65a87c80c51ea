"""Text-encoder-only attack in the style of Ring-A-Bell (Tsai et al., ICLR 2024): no UNet, no gradient.

1. Concept vector from paired prompts with and without the concept (E = the text encoder's output [77, D]):
       c = mean_i E(with_i) - mean_j E(without_j)
2. The problematic embedding of the prompt p:   T = E(p) + eta * c
3. A genetic search over K tokens a (in front of p, ldm.attacks.tokens) for
       min_a || E(a + p) - T ||^2        (mean over the [77, D] entries)
   population `population`, elitism (the best 10% survive), tournament selection of parents, one-point
   crossover, per-token mutation with probability `mutation`, `generations` rounds.

Candidate pool (ours, a cheap preselection): tokens are drawn from the `pool` allowed tokens whose own
embedding moves the text encoder's end-of-text output most in the concept's direction,
    score(v) = cos(E3(v)[EOS] - E2("")[EOS], mean_pos c)       (3-token sequences "BOS v EOS": one pass)
pool 0 draws from the whole allowed vocabulary. The search only sees the text encoder: it runs on a CPU,
and the adversarial prompt does not depend on the defence it is later evaluated on.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RABConfig:
    n_tokens: int = 5
    eta: float = 1.0
    population: int = 64
    generations: int = 40
    mutation: float = 0.2
    pool: int = 1024
    batch: int = 256             # sequences per text-encoder call


@torch.no_grad()
def embed(encoder, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Token ids [N, L] -> encoder outputs [N, L, D] (float32, CPU), in chunks."""
    return torch.cat([encoder.encode_tokens(ids[i:i + batch]).float().cpu() for i in range(0, len(ids), batch)])


@torch.no_grad()
def concept_vector(encoder, with_concept: list[str], without: list[str]) -> torch.Tensor:
    """c = mean E(with) - mean E(without) -> [77, D]."""
    if not with_concept or not without:
        raise ValueError("the concept vector needs prompts with and without the concept")
    e_with = embed(encoder, encoder.tokenize(list(with_concept)))
    e_without = embed(encoder, encoder.tokenize(list(without)))
    return e_with.mean(0) - e_without.mean(0)


@torch.no_grad()
def candidate_pool(space, c: torch.Tensor, size: int, batch: int = 1024) -> torch.Tensor:
    """Indices into the allowed vocabulary [size] (all of them when size is 0 or too large)."""
    n = len(space.ids)
    if size <= 0 or size >= n:
        return torch.arange(n)
    enc = space.encoder
    seqs = torch.stack([torch.full((n,), space.bos), space.ids, torch.full((n,), space.eos)], dim=1)  # [V, 3]
    h = embed(enc, seqs, batch)[:, 2]                                                                 # [V, D]
    h0 = embed(enc, torch.tensor([[space.bos, space.eos]]))[0, 1]                                     # [D]
    direction = c[1:].mean(0)
    score = torch.nn.functional.cosine_similarity(h - h0, direction[None], dim=1)
    return score.topk(size).indices


def fitness(space, pop: torch.Tensor, prompt: str, target: torch.Tensor, batch: int) -> torch.Tensor:
    """pop [N, K] allowed-vocabulary indices -> distance ||E(a + p) - T||^2 (mean) [N]: lower is better."""
    ids = space.with_prompt(space.ids[pop], prompt)
    return (embed(space.encoder, ids, batch) - target[None]).pow(2).mean(dim=(1, 2))


def next_generation(pop: torch.Tensor, dist: torch.Tensor, pool: torch.Tensor, cfg: RABConfig,
                    gen: torch.Generator) -> torch.Tensor:
    """Elitism + tournament selection + one-point crossover + mutation -> the next population [N, K]."""
    n, k = pop.shape
    order = dist.argsort()
    n_elite = max(1, n // 10)
    children = [pop[order[:n_elite]]]
    m = n - n_elite

    def tournament() -> torch.Tensor:
        a, b = torch.randint(0, n, (2, m), generator=gen)
        return torch.where((dist[a] < dist[b])[:, None], pop[a], pop[b])        # [m, K]
    pa, pb = tournament(), tournament()
    cut = torch.randint(1, k + 1, (m, 1), generator=gen)                           # one-point crossover
    child = torch.where(torch.arange(k)[None] < cut, pa, pb)
    mutate = torch.rand((m, k), generator=gen) < cfg.mutation
    child = torch.where(mutate, pool[torch.randint(0, len(pool), (m, k), generator=gen)], child)
    children.append(child)
    return torch.cat(children)


def run_attack(space, prompt: str, c: torch.Tensor, pool: torch.Tensor, cfg: RABConfig, gen: torch.Generator,
               progress=None) -> dict:
    """The genetic search for one prompt -> {text, ids, idx, distance (start, end), generations}."""
    target = embed(space.encoder, space.encoder.tokenize([prompt]))[0] + cfg.eta * c    # T [77, D]
    pop = pool[torch.randint(0, len(pool), (cfg.population, space.k), generator=gen)]   # [N, K]
    dist = fitness(space, pop, prompt, target, cfg.batch)
    first = float(dist.min())
    for g in range(cfg.generations):
        pop = next_generation(pop, dist, pool, cfg, gen)
        dist = fitness(space, pop, prompt, target, cfg.batch)
        if progress:
            progress({"loss": float(dist.min()), "generation": g + 1})
    best = pop[dist.argmin()]
    adv = space.ids[best]
    return {"text": space.text(adv, prompt), "ids": adv.tolist(), "idx": best, "distance_first": first,
            "distance_last": float(dist.min()), "generations": cfg.generations}
