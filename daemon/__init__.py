"""mlxd's daemon: the asyncio front end, the MLX worker thread, models and the CLI."""

__version__ = "0.1.0"
