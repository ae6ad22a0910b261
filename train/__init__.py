"""regionbert.train: multimodal BERT pretraining on region-feature shards (to come).

It reads shards through regionbert.data and never imports the detector (tests/test_layout.py)."""
