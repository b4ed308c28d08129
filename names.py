"""Names the command line offers as choices, kept free of numpy so `pertoken --help` stays light."""

BACKENDS = ("auto", "torch", "mlx")  # `auto`, then the registry's backends
POSITIONS = ("all", "prompt", "response")  # where a Steer acts
METHODS = ("mean_diff", "probe")  # how `extract` finds a direction
FORMATS = ("pt", "safetensors", "gguf")  # what `export` writes
SAMPLERS = ("plain", "model")  # plain: the given temperature; model: generation_config
