"""The protocol between the ServerApp and the nodes: every record name and key of a message,
written once for the server, the nodes, the tools and the tests.

The run-config keys are :class:`~feddm_flower.config.RunConfig`'s; the per-phase timings are
:mod:`feddm_flower.fed.timings`'.
"""

# Records of a message's content.
CONFIG = "config"  # ConfigRecord: what the server tells the node
METRICS = "metrics"  # MetricRecord: a reply's numbers
ARRAYS = "arrays"  # ArrayRecord: a whole model (Flower's strategies' name)
UPDATE = "update"  # ConfigRecord of bytes: a coded update (int8/int4/sparse uplink)
CHANGE = "model-change"  # ConfigRecord of bytes: coded changes of the model (downlink)

# Keys of the config the server sends (besides the codec's run-config keys).
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
UPLINK = "uplink"
MODEL_DIGEST = "model-digest"  # the model the node must hold after applying the message
MODEL_BASE = "model-base"  # the model the changes apply to
UNET_CONFIG = "unet-config"  # JSON of the UNet2DModel config (init-from); absent: the preset's
BASE_DIGEST = "base-digest"  # the frozen base weights the node builds on (LoRA on init-from)
FROZEN_DIGEST = "frozen-digest"  # the frozen LoRA factors (seeded) the node must rebuild
BASE = "base"  # ArrayRecord: the base weights, sent to a node that lacks them
# A train message asks the node to measure the model it received first (eval-loss, before
# training: no separate evaluate message that round).
EVALUATE_RECEIVED = "evaluate-received"

# Keys of a reply's metrics.
NUM_EXAMPLES = "num-examples"  # the reply's weight
TRAIN_LOSS, TRAIN_STEPS, TRAIN_SECONDS = "train-loss", "train-steps", "train-seconds"
EVAL_LOSS = "eval-loss"
EVAL_EXAMPLES = "eval-examples"  # a train reply's held-out images, eval-loss's weight
TRAIN_METRICS = (TRAIN_LOSS, TRAIN_STEPS, TRAIN_SECONDS)
EVAL_METRICS = (EVAL_LOSS,)

# Fields of a run's metrics.jsonl line (one per round) and its summary.json, which the
# server writes and the tools read. The traffic fields come from fed.accounting's ledger.
ROUND = "round"
GLOBAL_LOSS, GLOBAL_LOSS_EMA = "global-loss", "global-loss-ema"
FINAL_EVAL_LOSS = "final-eval-loss"  # the last round's model, by one evaluate message
FID, KID, FID_NUM_FAKE = "fid", "kid", "fid-num-fake"
DRIFT_MEAN = "drift-mean"  # the spread of clients' update norms: drift.summary("drift")
ROUND_SECONDS, WALL_SECONDS = "round-seconds", "wall-seconds"
BYTES_DOWN_CUMULATIVE, BYTES_UP_CUMULATIVE = "bytes-down-cumulative", "bytes-up-cumulative"
COMPRESSION_DOWN, COMPRESSION_UP = "compression-down", "compression-up"
BYTES_BASE_DOWN = "bytes-base-down"  # base models sent this round (LoRA), within the bytes down

# Node-config keys (flower-supernode --node-config, or the simulation's).
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
NUM_THREADS = "num-threads"
STATE_DIR = "state-dir"
