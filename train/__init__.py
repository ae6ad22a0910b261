"""regionbert.train: multimodal BERT pretraining on region-feature shards and captions.

    model.py        the single-stream transformer (ModelConfig beside it)
    tasks/          one module per objective: mlm, mrfr, mrc, mrc_kl, itm_wra (+ ot.py: IPOT)
    masking.py      what each task hides; conditional or joint masking
    text.py         WordPiece tokenization, caption manifests
    data.py         pairs, token-bucket sampler, task sampler, collate
    loop.py         the training loop; optim.py, checkpoint.py, metrics.py its helpers
    config.py       the run's config; setup.py builds a run from it; cli.py is `regionbert-pretrain`

It reads shards through regionbert.data and never imports the detector (tests/test_layout.py)."""
