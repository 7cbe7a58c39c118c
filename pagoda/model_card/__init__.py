"""The model card: what every service but the worker knows of a model.

One file, one job:

- ``card``: ``ModelCard``, the card format (``model.json``) and reading a card folder.
- ``identity``: the model identity hash and the weight index it covers.
- ``safetensors_header``: the JSON header of a safetensors file.
- ``hf_config``: what a Hugging Face folder's config files say (EOS ids, lengths).
- ``gguf_metadata``: what a GGUF file's metadata says, as a Hugging Face config.
- ``writer``: writing a card where the weights are (``pagoda prepare-model``).
- ``errors``: ``ModelCardError`` and the JSON reader that raises it.

The gateway and the scheduler read cards and must not import torch or transformers,
so nothing here imports them at the top of a module. Only the writer needs
transformers (to convert a GGUF tokenizer), and it imports it inside that function.
This file imports nothing, so importing one part never loads another.
"""
