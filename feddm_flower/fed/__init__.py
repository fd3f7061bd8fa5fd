"""Federated mechanics without Flower: codecs of both directions, the downlink chain, the
reply guard's checks and bounds, the traffic ledger, a node's store and timings."""
