"""`ragblend serve`: the OpenAI-compatible HTTP server (install the `serve` extra)."""
