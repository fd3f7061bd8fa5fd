"""The Flower layer: ServerApp, ClientApp, the strategy, records, the node worker."""
