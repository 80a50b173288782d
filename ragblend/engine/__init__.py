"""The engine: model, prompt layout, KV loading, token selection, fused prefill and decoding."""
