"""The Hugging Face remote-code files of an exported model (configuration_regionbert.py, modeling_regionbert.py).

`regionbert-pretrain export` copies them into the folder it writes; transformers imports them from there
(`trust_remote_code=True`). Importing this package imports nothing: regionbert.train never needs transformers.
"""
