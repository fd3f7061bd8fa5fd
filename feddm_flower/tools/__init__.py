"""Command-line tools (``python -m feddm_flower.tools.<name>``); nothing imports them."""
