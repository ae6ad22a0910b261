"""The pretraining objectives, one small module each: its head and its loss, returning named losses.

Every head is built as head(cfg, encoder, ...) (the encoder: for the weights UNITER ties to it) and
called as head(encoder_output, batch), returning {loss name: scalar tensor}. TASKS maps the task names
used in configs (tasks.mix) to the head classes.
"""

from .itm_wra import ITMHead
from .mlm import MLMHead
from .mrc import MRCHead, RegionClassifier
from .mrc_kl import MRCKLHead
from .mrfr import MRFRHead

TASKS = {"mlm": MLMHead, "mrfr": MRFRHead, "mrc": MRCHead, "mrc_kl": MRCKLHead, "itm": ITMHead}

__all__ = ["TASKS", "ITMHead", "MLMHead", "MRCHead", "MRCKLHead", "MRFRHead", "RegionClassifier"]
