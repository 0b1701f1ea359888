"""OpenAI-compatible HTTP serving of a tilert Engine (`python -m tilert serve`); needs aiohttp."""
