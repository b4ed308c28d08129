"""The CLI's commands, one module per group of stages; `pertoken.cli` imports them."""
