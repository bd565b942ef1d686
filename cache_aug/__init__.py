"""cache-aug: differentiable cache augmentation for frozen LLMs (plain torch + transformers, no Ray).

Modules:
- the method: layout, masks, passes, losses, augment, kv, coprocessor, architecture;
- its models: decoder, gguf_checkpoint, tiny, tiny_spec, tiny_pretrain, corpus;
- storage: records, checksum, store, fingerprint;
- serving: engine, lru, document_texts;
- training and evaluation: optim (the one optimiser and schedule), blocks (the one packer), training, evaluate,
  stats, report, sweep, arithmetic;
- configs: config, model_config, stage_config, typed_config;
- helpers: paths, dtypes, documents, testing.

See README.md; the `cache-aug` command is jobs/cli.py.
"""
