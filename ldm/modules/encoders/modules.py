"""The text encoder: CLIP ViT-L/14's text tower, built from a config, with an offline tokenizer.

    prompts: list[str]  ->  token ids [B, 77]  ->  last hidden state [B, 77, 768]

`.transformer` is transformers' CLIPTextModel (weights come from the SD checkpoint's
`cond_stage_model.transformer.text_model.*`; nothing is downloaded). `.tokenizer` is
transformers' CLIPTokenizer read from the BPE files in ./clip_tokenizer/, which
scripts/tools/make_clip_vocab.py builds from OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (MIT).
"""
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).with_name("clip_tokenizer")
BOS_ID, EOS_ID = 49406, 49407  # <|startoftext|>, <|endoftext|> (also the padding token)


def load_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the files shipped with this repository."""
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=max_length)


class FrozenCLIPEmbedder(nn.Module):
    """CLIP text encoder used by SD v1. Defaults give ViT-L/14's text tower (123M parameters).

    `version` is accepted for compatibility with CompVis configs and ignored: the architecture comes from
    the arguments below and the weights from the checkpoint.
    """

    def __init__(self, version: str | None = None, device=None, max_length: int = 77, vocab_size: int = 49408,
                 width: int = 768, layers: int = 12, heads: int = 12, mlp_ratio: int = 4, freeze: bool = True):
        super().__init__()
        self.max_length = max_length
        self.tokenizer = load_tokenizer(max_length)
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * mlp_ratio,
                                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=width,
                                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
        config._attn_implementation = "sdpa"
        self.transformer = CLIPTextModel(config)
        if freeze:
            self.transformer.requires_grad_(False)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[B] prompts -> [B, max_length] ids: BOS, tokens (truncated), EOS, EOS padding."""
        if isinstance(prompts, str):
            raise TypeError("FrozenCLIPEmbedder expects a list of prompts, got a single string")
        batch = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
        return batch["input_ids"]

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = self.transformer.get_input_embeddings().weight.device
        tokens = self.tokenize(prompts).to(device)
        return self.transformer(input_ids=tokens).last_hidden_state  # [B, 77, width]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self(prompts)

    def token_embedding(self) -> nn.Embedding:
        """The vocabulary's input embeddings: weight [vocab_size, width]."""
        return self.transformer.get_input_embeddings()

    def encode_tokens(self, tokens: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, max_length] -> last hidden state [B, max_length, width], with gradients (no no_grad).

        embeds [B, max_length, width]: token embeddings used instead of the vocabulary lookup (soft prompts,
        ldm.attacks); the ids still mark where the text ends (the pooled output) and position embeddings are
        added as usual. Works by replacing the lookup's output, so it is independent of transformers' layout."""
        device = self.token_embedding().weight.device
        tokens = tokens.to(device)
        if embeds is None:
            return self.transformer(input_ids=tokens).last_hidden_state
        if embeds.shape[:2] != tokens.shape:
            raise ValueError(f"encode_tokens: embeds {tuple(embeds.shape)} do not match tokens {tuple(tokens.shape)}")
        handle = self.token_embedding().register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
        try:
            return self.transformer(input_ids=tokens).last_hidden_state
        finally:
            handle.remove()

    def rebuild_buffers(self) -> None:
        """Recreate position_ids (a non-persistent buffer) after the model was built on the meta device."""
        device = self.transformer.get_input_embeddings().weight.device
        for module in self.transformer.modules():
            if "position_ids" in module._buffers:
                module.position_ids = torch.arange(self.max_length, device=device).expand(1, -1)
