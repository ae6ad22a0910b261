"""RegionBert for Hugging Face transformers (remote code: `trust_remote_code=True`).

This file is copied into every folder `regionbert-pretrain export` writes; config.json's `auto_map` points
here. It imports torch and transformers only, and computes exactly what regionbert's trainer computes
(regionbert/train/model.py and the heads in regionbert/train/tasks/): the same modules under the same
names, the same operations in the same order, so the outputs agree to float32 rounding (a test checks).

    RegionBertModel             AutoModel: hidden states of text and regions, the pooled [CLS]
    RegionBertForPreTraining    AutoModelForPreTraining: the encoder under `regionbert.` plus the heads:
                                ITM (match logits), MLM (word logits), MRFR (region features),
                                MRC / MRC-kl (the detector's classes)

Inputs (padding on the right, as a tokenizer pads):
    input_ids               (B, L)  [CLS] words [SEP] from the folder's tokenizer
    attention_mask          (B, L)  1 on tokens, 0 on padding (default: all tokens)
    region_features         (B, N, feature_dim) detector features of each image's boxes
    region_locations        (B, N, loc_dim) [x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H)] (loc_dim 7)
    region_attention_mask   (B, N)  1 on boxes, 0 on padding (default: all boxes)
    region_mask             (B, N)  bool, optional: regions whose feature is hidden (masked region modelling)

Inside, each sample is packed without holes (its text, then its regions, then padding), as in training;
outputs are given back in the input layout, with padded positions set to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_regionbert import RegionBertConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.heads, self.dropout = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # query, key, value fused, in that order
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    """A BERT layer: post-LayerNorm residual attention, then a GELU MLP."""

    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.intermediate_size), nn.GELU(),
                                 nn.Linear(cfg.intermediate_size, cfg.hidden_size))
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, keep):
        x = self.ln1(x + self.drop(self.attn(x, keep)))
        return self.ln2(x + self.drop(self.mlp(x)))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, type_emb):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.ln(self.word(input_ids) + self.position(pos) + type_emb))


class RegionEmbeddings(nn.Module):
    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.feature, self.feature_ln = nn.Linear(cfg.feature_dim, C), nn.LayerNorm(C, eps=eps)
        self.location, self.location_ln = nn.Linear(cfg.loc_dim, C), nn.LayerNorm(C, eps=eps)
        self.ln = nn.LayerNorm(C, eps=eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.feature_dim)) if cfg.region_mask_embedding else None

    def forward(self, features, locations, region_mask, type_emb):
        w = self.feature.weight
        features, locations = features.to(w.dtype), locations.to(w.dtype)
        if region_mask is not None:  # a masked region shows nothing of its feature, only its box
            hide = region_mask.unsqueeze(-1)
            features = features.masked_fill(hide, 0.0)
            if self.mask_embedding is not None:
                features = features + hide * self.mask_embedding
        x = self.feature_ln(self.feature(features)) + self.location_ln(self.location(locations)) + type_emb
        return self.drop(self.ln(x))


def _lengths(mask: torch.Tensor | None, batch: int, width: int, device, name: str) -> torch.Tensor:
    """(B,) lengths from a right-padded 0/1 mask; the model packs text and regions, so a hole is an error."""
    if mask is None:
        return torch.full((batch,), width, dtype=torch.long, device=device)
    if mask.shape != (batch, width):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {(batch, width)}")
    mask = mask.bool()
    lens = mask.sum(1)
    if not torch.equal(mask, torch.arange(width, device=device).unsqueeze(0) < lens.unsqueeze(1)):
        raise ValueError(f"{name} must be 1s then 0s in every row (padding on the right)")
    return lens


@dataclass
class RegionBertOutput(ModelOutput):
    """last_hidden_state (B, L + N, C): the text outputs, then the region outputs (input layout, padding zero);
    text_hidden_state (B, L, C), region_hidden_state (B, N, C): the same, split; pooler_output (B, C):
    tanh(Linear([CLS] output)), what ITM classifies."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    text_hidden_state: torch.Tensor | None = None
    region_hidden_state: torch.Tensor | None = None


@dataclass
class RegionBertForPreTrainingOutput(ModelOutput):
    """The encoder's outputs plus every head's: itm_logits (B, 2) [no match, match]; itm_score (B,) their
    difference (what retrieval ranks by); mlm_logits (B, L, vocab); mrfr_features (B, N, feature_dim);
    mrc_logits (B, N, classes) and mrc_kl_logits (the same tensor when the classifier is shared)."""

    itm_logits: torch.Tensor | None = None
    itm_score: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    mrfr_features: torch.Tensor | None = None
    mrc_logits: torch.Tensor | None = None
    mrc_kl_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    text_hidden_state: torch.Tensor | None = None
    region_hidden_state: torch.Tensor | None = None


class RegionBertPreTrainedModel(PreTrainedModel):
    config_class = RegionBertConfig
    base_model_prefix = "regionbert"
    _no_split_modules = ["Layer"]

    def _init_weights(self, module):
        """BERT's initialisation, for weights a checkpoint does not hold (an exported folder holds them all)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, RegionEmbeddings) and module.mask_embedding is not None:
            module.mask_embedding.data.normal_(0.0, 0.02)


class RegionBertModel(RegionBertPreTrainedModel):
    _keys_to_ignore_on_load_unexpected = [r"^heads\."]  # the pretraining heads, when loaded alone

    def __init__(self, config: RegionBertConfig):
        super().__init__(config)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        if config.loc_dim not in (5, 7):
            raise ValueError(f"loc_dim must be 5 or 7, got {config.loc_dim}")
        if config.hidden_act != "gelu":
            raise ValueError(f"hidden_act {config.hidden_act!r}: this model was trained with exact GELU ('gelu')")
        self.text_embeddings = TextEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config)
        self.type_embeddings = nn.Embedding(2, config.hidden_size)  # 0 text, 1 region
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.text_embeddings.word

    def set_input_embeddings(self, value):
        self.text_embeddings.word = value

    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, region_locations: torch.Tensor,
                attention_mask: torch.Tensor | None = None, region_attention_mask: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs):
        B, L = input_ids.shape
        N = region_features.shape[1]
        if region_features.shape[:2] != region_locations.shape[:2] or region_features.shape[0] != B:
            raise ValueError(f"region_features {tuple(region_features.shape)} and region_locations "
                             f"{tuple(region_locations.shape)} must be (B={B}, N, ...) alike")
        if L > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {L} tokens; this model has {self.config.max_position_embeddings} "
                             "positions (truncate, e.g. tokenizer(..., truncation=True))")
        text_lens = _lengths(attention_mask, B, L, input_ids.device, "attention_mask")
        region_lens = _lengths(region_attention_mask, B, N, input_ids.device, "region_attention_mask")
        # regionbert/train/model.py RegionBert.forward, line for line
        text = self.text_embeddings(input_ids, self.type_embeddings.weight[0])
        regions = self.region_embeddings(region_features, region_locations, region_mask, self.type_embeddings.weight[1])
        lengths = text_lens + region_lens
        T = int(lengths.max())
        t = torch.arange(T, device=input_ids.device).unsqueeze(0)
        tl = text_lens.unsqueeze(1)
        src = torch.where(t < tl, t, L + t - tl).clamp(max=L + N - 1)
        x = torch.cat([text, regions], dim=1).gather(1, src.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        keep = (t < lengths.unsqueeze(1)).view(B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, keep)
        pos = (tl + torch.arange(N, device=x.device).unsqueeze(0)).clamp(max=T - 1)
        out_regions = x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        out_text = x[:, :L] if T >= L else F.pad(x, (0, 0, 0, L - T))
        pooled = torch.tanh(self.pooler(x[:, 0]))
        # padding positions: zero (in training they are "meaningless"; here they are defined)
        out_text = out_text * (torch.arange(L, device=x.device) < tl).unsqueeze(-1)
        out_regions = out_regions * (torch.arange(N, device=x.device) < region_lens.unsqueeze(1)).unsqueeze(-1)
        return RegionBertOutput(last_hidden_state=torch.cat([out_text, out_regions], dim=1), pooler_output=pooled,
                                text_hidden_state=out_text, region_hidden_state=out_regions)


def _transform(cfg: RegionBertConfig) -> nn.Module:
    """BERT's prediction-head transform: Linear, GELU, LayerNorm (regionbert/train/tasks/common.py)."""
    return nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                         nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps))


class MLMHead(nn.Module):
    """Words: transform, then the word embeddings (tied: read from the encoder at call time) plus a bias."""

    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.transform = _transform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class MRFRHead(nn.Module):
    """Region features: transform, then the transpose of the region feature projection (tied) plus a bias."""

    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.transform = _transform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.feature_dim))


class RegionClassifier(nn.Module):
    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.transform = _transform(cfg)
        self.classify = nn.Linear(cfg.hidden_size, cfg.num_region_classes)

    def forward(self, h):
        return self.classify(self.transform(h))


class MRCHead(nn.Module):
    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.classifier = RegionClassifier(cfg)


class ITMHead(nn.Module):
    def __init__(self, cfg: RegionBertConfig):
        super().__init__()
        self.classify = nn.Linear(cfg.hidden_size, 2)


class RegionBertForPreTraining(RegionBertPreTrainedModel):
    """The encoder and every pretraining head. The MLM decoder and the MRFR regressor are the encoder's own
    word embeddings and region feature projection (tied, as in training), so the file stores them once."""

    def __init__(self, config: RegionBertConfig):
        super().__init__(config)
        self.regionbert = RegionBertModel(config)
        heads = {"mlm": MLMHead(config), "mrfr": MRFRHead(config), "mrc": MRCHead(config), "itm": ITMHead(config)}
        if not config.shared_region_classifier:
            heads["mrc_kl"] = MRCHead(config)
        self.heads = nn.ModuleDict(heads)
        self.post_init()

    def get_input_embeddings(self):
        return self.regionbert.text_embeddings.word

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) text outputs -> (..., vocab) word logits."""
        head = self.heads["mlm"]
        return head.transform(h) @ self.regionbert.text_embeddings.word.weight.t() + head.bias

    def mrfr_features(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) region outputs -> (..., feature_dim) reconstructed features."""
        head = self.heads["mrfr"]
        return head.transform(h) @ self.regionbert.region_embeddings.feature.weight + head.bias

    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, region_locations: torch.Tensor,
                attention_mask: torch.Tensor | None = None, region_attention_mask: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs):
        out = self.regionbert(input_ids, region_features, region_locations, attention_mask, region_attention_mask,
                              region_mask)
        itm = self.heads["itm"].classify(out.pooler_output)
        mrc = self.heads["mrc"].classifier(out.region_hidden_state)
        mrc_kl = self.heads["mrc_kl"].classifier(out.region_hidden_state) if "mrc_kl" in self.heads else mrc
        return RegionBertForPreTrainingOutput(
            itm_logits=itm, itm_score=itm[:, 1] - itm[:, 0], mlm_logits=self.mlm_logits(out.text_hidden_state),
            mrfr_features=self.mrfr_features(out.region_hidden_state), mrc_logits=mrc, mrc_kl_logits=mrc_kl,
            last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
            text_hidden_state=out.text_hidden_state, region_hidden_state=out.region_hidden_state)
