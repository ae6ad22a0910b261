"""The single-stream multimodal BERT: text tokens and detector regions in one transformer.

    [CLS] w1 ... wL [SEP] r1 ... rN  ->  12 BERT layers  ->  one output vector per token and region

Text embeddings are BERT's (word + position + type 0). A region has no order, so its "position" is its
box: LayerNorm(Linear(feature)) + LayerNorm(Linear(location)) + type 1, then LayerNorm (UNITER). A
masked region's feature is replaced by a zero vector plus a learned mask embedding (UNITER's
`mask_embedding`, initialised N(0, 0.02)) before that feature Linear + LayerNorm.

What is UNITER's here (checked side by side with UNITER's model/model.py and model/pretrain.py) and what
is not:
- UNITER's: the embeddings above, post-LayerNorm BERT layers, the pooler, the masked-region input (zeros
  + learned mask embedding), and the heads in train/tasks/: MLM decoder tied to the word embeddings;
  MRFR regressor tied to the transpose of the region feature projection (`feature.weight`) plus its
  own bias; one region classifier shared by MRC and MRC-kl; ITM on the pooled [CLS]; WRA by IPOT over
  every text token ([CLS] and [SEP] included) and every region.
- Not UNITER's, for training from scratch only (UNITER always starts from BERT): without
  `run.init_from`, the pooler and the ITM classifier are drawn at std 1/sqrt(hidden) instead of 0.02
  (`itm_head_init = "auto"`; "bert" keeps 0.02 from scratch too). With `run.init_from` they are UNITER's.
- Named options, not UNITER's defaults: `region_mask_embedding = false` feeds the zero vector alone
  (beware: with the feature bias at zero, LayerNorm of that constant vector back-propagates with a gain
  of about 1/sqrt(eps), which makes MRFR / MRC gradients 10^4 times MLM's at initialisation);
  `shared_region_classifier = false` gives MRC and MRC-kl a head each.
- Implemented differently, same function: one fused qkv matrix, and text + regions packed without
  holes (UNITER gathers them the same way; the outputs are the same).

Each sample is packed without holes: its text, then its regions, then padding to the batch's longest
(text + regions). So a batch sorted by that total length (train/data.py) pads almost nothing.

Attention goes through F.scaled_dot_product_attention (flash / memory-efficient kernels when they
apply). The layers are post-LayerNorm like BERT, so BERT weights could be loaded into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 30522  # set from the tokenizer
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_text_len: int = 60  # position embeddings; text is truncated to this, [CLS] and [SEP] included
    feature_dim: int = 1024  # set from the shards
    num_classes: int = 91  # detector classes, background at 0; set from the shards
    loc_dim: int = 7  # 5 (ViLBERT) or 7 (UNITER) location vector
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # a masked region's feature: zeros + a learned mask embedding (UNITER); False: the zeros alone
    region_mask_embedding: bool = True
    shared_region_classifier: bool = True  # MRC and MRC-kl share one classifier (UNITER); False: one each
    # ITM's pooler and classifier at init: "bert" N(0, 0.02) (UNITER's, whose pooler then comes from BERT);
    # "scaled" N(0, 1/hidden_size): from scratch, ITM's gradient reaches the encoder unshrunk; "zero": the
    # pooler scaled, the classifier at zero (every pair scored alike at first; slower on the learning
    # test's scenes: docs/itm-plateau.md); "auto": "bert" with run.init_from, "scaled" without
    itm_head_init: str = "auto"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} is not a multiple of model.num_heads "
                             f"{self.num_heads}")
        if self.loc_dim not in (5, 7):
            raise ValueError(f"model.loc_dim must be 5 or 7, got {self.loc_dim}")
        if self.itm_head_init not in ("auto", "bert", "scaled", "zero"):
            raise ValueError(f"model.itm_head_init must be auto, bert, scaled or zero, got {self.itm_head_init!r}")


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dropout = cfg.num_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        # keep: (B, 1, 1, T) True for real keys; padding is never attended to
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    """A BERT layer: post-LayerNorm residual attention, then a GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.intermediate_size), nn.GELU(),
                                 nn.Linear(cfg.intermediate_size, cfg.hidden_size))
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, keep):
        x = self.ln1(x + self.drop(self.attn(x, keep)))
        return self.ln2(x + self.drop(self.mlp(x)))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_text_len, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, type_emb):  # (B, L) -> (B, L, C)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.ln(self.word(input_ids) + self.position(pos) + type_emb))


class RegionEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.feature, self.feature_ln = nn.Linear(cfg.feature_dim, C), nn.LayerNorm(C, eps=eps)
        self.location, self.location_ln = nn.Linear(cfg.loc_dim, C), nn.LayerNorm(C, eps=eps)
        self.ln = nn.LayerNorm(C, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)
        # UNITER's mask_embedding is nn.Embedding(2, D, padding_idx=0) with row 0 kept at zero: one learned
        # (D,) vector, N(0, 0.02) like every embedding; it gets weight decay as UNITER's does
        self.mask_embedding = nn.Parameter(torch.randn(cfg.feature_dim) * 0.02) if cfg.region_mask_embedding else None

    def forward(self, features, locations, region_mask, type_emb):  # (B, N, D), (B, N, loc), (B, N) -> (B, N, C)
        w = self.feature.weight
        features, locations = features.to(w.dtype), locations.to(w.dtype)  # e.g. float16 from the shards
        if region_mask is not None:  # a masked region shows nothing of its feature, only its box
            hide = region_mask.unsqueeze(-1)  # (B, N, 1)
            features = features.masked_fill(hide, 0.0)
            if self.mask_embedding is not None:
                features = features + hide * self.mask_embedding  # zeros + the mask embedding, as UNITER
        x = self.feature_ln(self.feature(features)) + self.location_ln(self.location(locations)) + type_emb
        return self.drop(self.ln(x))


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, T, C) packed: text, regions, padding
    text: torch.Tensor  # (B, L, C) the text outputs (positions past a sample's length are meaningless)
    regions: torch.Tensor  # (B, N, C) the region outputs, unpacked (same caveat)
    pooled: torch.Tensor  # (B, C) tanh(Linear([CLS] output)), for image-text matching


class RegionBert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text_embeddings = TextEmbeddings(cfg)
        self.region_embeddings = RegionEmbeddings(cfg)
        self.type_embeddings = nn.Embedding(2, cfg.hidden_size)  # 0 text, 1 region
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(init_weights)

    def forward(self, input_ids, text_lens, features, locations, region_lens, region_mask=None) -> EncoderOutput:
        """input_ids (B, L) long, text_lens (B,), features (B, N, D), locations (B, N, loc_dim),
        region_lens (B,), region_mask (B, N) bool or None: regions whose feature is hidden."""
        B, L = input_ids.shape
        N = features.shape[1]
        text = self.text_embeddings(input_ids, self.type_embeddings.weight[0])  # (B, L, C)
        regions = self.region_embeddings(features, locations, region_mask, self.type_embeddings.weight[1])  # (B, N, C)
        # pack: output position t of sample b takes text t if t < text_len, else region t - text_len
        lengths = text_lens + region_lens  # (B,)
        T = int(lengths.max())
        t = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        tl = text_lens.unsqueeze(1)  # (B, 1)
        src = torch.where(t < tl, t, L + t - tl).clamp(max=L + N - 1)  # (B, T) index into [text; regions]
        x = torch.cat([text, regions], dim=1).gather(1, src.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        keep = (t < lengths.unsqueeze(1)).view(B, 1, 1, T)  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, keep)  # (B, T, C)
        # unpack: text outputs are in place; region j of sample b sits at text_len + j
        pos = (tl + torch.arange(N, device=x.device).unsqueeze(0)).clamp(max=T - 1)  # (B, N)
        out_regions = x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        out_text = x[:, :L] if T >= L else F.pad(x, (0, 0, 0, L - T))
        return EncoderOutput(x, out_text, out_regions, torch.tanh(self.pooler(x[:, 0])))


def init_weights(m: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def num_parameters(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n else "0"
