"""feddm-flower: federated training of diffusion models (FedDM) with Flower."""

import logging


def configure_logging(level: int = logging.INFO) -> None:
    """Send this package's log lines to stderr (once per process), beside Flower's."""
    logger = logging.getLogger(__name__)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
