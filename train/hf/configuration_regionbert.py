"""RegionBert's configuration for Hugging Face transformers (remote code: `trust_remote_code=True`).

This file is copied into every folder `regionbert-pretrain export` writes; config.json's `auto_map` points
here. It imports transformers only. Field names follow BERT's where BERT has the same thing
(num_hidden_layers, max_position_embeddings, ...); the region side has its own.
"""

try:  # transformers >= 5 spells it PreTrainedConfig (PretrainedConfig stays as an alias)
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class RegionBertConfig(PreTrainedConfig):
    """A single-stream multimodal BERT (UNITER's design): [CLS] words [SEP] then detector regions, one
    transformer. A region enters as LayerNorm(Linear(feature)) + LayerNorm(Linear(location)) + type 1."""

    model_type = "regionbert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact (erf) GELU; the only one this model has
    hidden_dropout_prob: float = 0.1  # one dropout for embeddings, attention and MLP (as trained)
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 60  # text tokens, [CLS] and [SEP] included
    type_vocab_size: int = 2  # 0 text, 1 region
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    feature_dim: int = 1024  # region feature width (the detector's)
    loc_dim: int = 7  # 7: [x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H)] (UNITER); 5: ViLBERT's
    num_region_classes: int = 91  # the detector's classes, background at 0 (MRC heads); 0: none
    region_mask_embedding: bool = True  # a masked region: zeros + a learned vector (UNITER)
    shared_region_classifier: bool = True  # MRC and MRC-kl share one classifier (UNITER)
    max_regions: int = 100  # regions per image the model was trained with (more are dropped)
    region_class_names: list | None = None  # the detector's class names, index = MRC logit column
