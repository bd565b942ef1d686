"""cache-aug: differentiable cache augmentation for frozen LLMs (plain torch + transformers, no Ray).

Modules: config, decoder, coprocessor, masks, passes, augment, losses, records, fingerprint, engine, lru,
document_texts, training, corpus, tiny. See README.md (the `cache-aug` command is jobs/cli.py).
"""
