"""Adversarial tokens in front of a prompt: the search space both attacks share, and how it becomes text.

    ids  [77] = BOS, adv_1 .. adv_K, the prompt's tokens (truncated to fit), EOS, EOS padding
    text      = "word_1 ... word_K <prompt>"           what a generation script replays

The vocabulary is restricted to whole-word tokens of letters or a single digit ("three</w>", "x</w>", "7</w>"):
written with spaces between them, such a token re-tokenises to itself, so the text replays the ids that were
optimised (the runner re-tokenises the text, evaluates THAT, and records whether the ids round-tripped).
"""
import re
from functools import lru_cache

import torch

_WORD = re.compile(r"^(?:[a-z]+|[0-9])</w>$")


@lru_cache(maxsize=4)
def _allowed(vocab_items: tuple) -> tuple[list[int], list[str]]:
    pairs = sorted((i, t[:-4]) for t, i in vocab_items if _WORD.match(t))
    return [i for i, _ in pairs], [w for _, w in pairs]


class TokenSpace:
    """The allowed vocabulary of a text encoder (FrozenCLIPEmbedder) and the prompt <-> ids plumbing."""

    def __init__(self, encoder, n_tokens: int):
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        self.encoder, self.k = encoder, n_tokens
        tok = encoder.tokenizer
        ids, words = _allowed(tuple(tok.get_vocab().items()))
        self.ids = torch.tensor(ids, dtype=torch.long)                  # [V] allowed vocabulary ids
        self.words = dict(zip(ids, words))
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id

    def table(self) -> torch.Tensor:
        """Embeddings of the allowed tokens [V, D] (the encoder's weights, no gradient)."""
        weight = self.encoder.token_embedding().weight
        return weight.detach()[self.ids.to(weight.device)]

    def with_prompt(self, adv: torch.Tensor, prompt: str) -> torch.Tensor:
        """adv [N, K] vocabulary ids -> token ids [N, 77]: BOS, adv, prompt (truncated), EOS padding."""
        full = self.encoder.tokenize([prompt])[0]                        # [77]: BOS, p, EOS, pad
        body = full[1:][full[1:] != self.eos]                            # the prompt's own tokens
        n, length = adv.shape[0], full.shape[0]
        body = body[: max(0, length - 2 - self.k)]
        out = torch.full((n, length), self.eos, dtype=torch.long)
        out[:, 0] = self.bos
        out[:, 1:1 + self.k] = adv.cpu()
        out[:, 1 + self.k:1 + self.k + len(body)] = body
        return out

    def text(self, adv: torch.Tensor, prompt: str) -> str:
        """adv [K] ids -> the adversarial prompt as text."""
        words = " ".join(self.words[int(i)] for i in adv)
        return f"{words} {prompt}".strip()

    def round_trips(self, adv: torch.Tensor, prompt: str) -> bool:
        """Does the text re-tokenise to the ids that were optimised?"""
        return bool((self.encoder.tokenize([self.text(adv, prompt)])[0] == self.with_prompt(adv[None], prompt)[0]).all())

    def nearest(self, soft: torch.Tensor) -> torch.Tensor:
        """soft [K, D] -> indices into the allowed vocabulary [K] of the nearest embeddings (L2)."""
        return torch.cdist(soft.detach().float(), self.table().float()).argmin(dim=1).cpu()

    def random(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, K] random allowed vocabulary ids."""
        pick = torch.randint(0, len(self.ids), (n, self.k), generator=generator)
        return self.ids[pick]
