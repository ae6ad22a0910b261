"""regionbert.train: multimodal BERT pretraining on region-feature shards and captions.

    model.py        the single-stream transformer (ModelConfig beside it)
    tasks/          one module per objective: mlm, mrfr, mrc, mrc_kl, itm_wra (+ ot.py: IPOT)
    masking.py      what each task hides; conditional or joint masking
    text.py         WordPiece tokenization, caption manifests
    data.py         pairs, token-bucket sampler, task sampler, batch reading + masking, collate, DeviceFeed
    loop.py         the training loop (mixed precision, non-finite loss stop); optim.py its helper
    checkpoint.py   atomic checkpoints with optimizer, scaler, RNG states and the data position
    distributed.py  torchrun: ranks, devices, the few collectives; DDP is set up in run.py
    bert.py         start from a local Hugging Face BERT (safetensors or weights-only .bin)
    evaluate.py     held-out accuracy (MLM, MRC, ITM) and zero-shot retrieval R@1/5/10 by the ITM head
    metrics.py      console, log.jsonl, TensorBoard; plot.py draws RUN/curves.png
    config.py       the run's config; run.py builds and runs a run from it; cli.py is `regionbert-pretrain`
    export.py       a run as a Hugging Face model folder (`regionbert-pretrain export`), and load_exported
    hf/             the folder's own model code for transformers (torch + transformers only, no regionbert)
    infer.py        Model.load(folder or run).encode(records, captions): ITM scores and hidden states; `score`

It reads shards through regionbert.data and never imports the detector (tests/test_layout.py)."""
