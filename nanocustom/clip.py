"""CLIP's text tower (Radford et al. 2021), the frozen text encoder of Stable Diffusion v1.

SD v1 conditions its UNet on the last hidden state of OpenAI's ViT-L/14 text transformer, after the
final layer norm (Rombach et al. 2022, §3.3 and Appendix). Module names equal the checkpoint's keys
under `cond_stage_model.transformer.text_model.`, so `load_state_dict` is the whole loader.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanocustom.tokenizer import Tokenizer  # noqa: F401  (re-exported: the tokenizer belongs beside its encoder)


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary, incl. <|startoftext|> 49406 and <|endoftext|> 49407
    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # context length: BOS + 75 tokens + EOS
    causal: bool = True  # CLIP's mask; the shapes model's encoder sees the whole caption (pretrain.TEXT_CONFIG)


class CLIPAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.causal = config.num_attention_heads, config.causal
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, h, T, hs)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # causal: each sees only those before
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x)  # quick-GELU, as OpenAI trained it
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or CLIPTextConfig()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids):
        """input_ids [B, 77] -> token features [B, 77, hidden_size], the UNet's cross-attention context."""
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))

    def grow_token_embedding(self, num_new):
        """Append rows for modifier tokens registered with `Tokenizer.add_tokens` (Kumari et al. §3.1).

        The new rows start as copies of the last rows' mean; callers initialise them (e.g. from rare tokens).
        """
        old = self.embeddings.token_embedding
        new = nn.Embedding(old.num_embeddings + num_new, old.embedding_dim, device=old.weight.device,
                           dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[:old.num_embeddings] = old.weight
            new.weight[old.num_embeddings:] = old.weight.mean(0)
        self.embeddings.token_embedding = new
        self.config = dataclasses.replace(self.config, vocab_size=new.num_embeddings)  # configs may be shared
        return list(range(old.num_embeddings, new.num_embeddings))
