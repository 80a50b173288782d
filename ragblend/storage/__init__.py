"""The store folder's lifecycle: documents in, KV and vectors kept, budgeted, expired, collected, re-indexed."""
