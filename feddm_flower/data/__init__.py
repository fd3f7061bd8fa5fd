"""Data: datasets on disk, flwr-datasets partitions, and what the apps load from them."""
