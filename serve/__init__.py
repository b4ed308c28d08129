"""`pertoken serve`: an OpenAI-compatible chat server with per-request steering and per-token
projections, and the lab page that talks to it."""
