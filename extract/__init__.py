"""regionbert.extract: images -> region-feature shards with a torchvision Faster R-CNN (to come)."""
