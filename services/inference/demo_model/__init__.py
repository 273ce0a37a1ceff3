"""Package data: the bundled demo model (config.json, model.safetensors, tokenizer files)."""
