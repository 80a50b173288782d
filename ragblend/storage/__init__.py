"""The store and everything that writes it: documents in, chunk KV kept present and budgeted, conversations'
records, expiry, collection and re-indexing. Below the request path; may run the engine to compute KV."""
