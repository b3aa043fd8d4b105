"""Arrow schemas of the three long tables. Invariant: in `scores`, the key
(model_id, model_digest, detector, detector_version, config_hash) identifies a result; readers
keep one row per key (the latest ok row, else the latest row) so retries never double-count.

Ground-truth columns (gt_*) are copied from the manifest by the runner for the reducer;
detectors never see them.
"""
import pyarrow as pa

SCHEMA_VERSION = "1"
# ok: scored; error: final failure (bad file, detector error); not_applicable: final, the
# detector does not apply to this model (BAN on a model without BatchNorm; the error column
# says why), not a failure; timeout: past the time limit; crashed: the worker died every
# attempt; retryable: a storage failure that may pass (a network blip): the next run scans it
# again, as timeout and crashed rows.
STATUSES = ("ok", "error", "not_applicable", "timeout", "crashed", "retryable")
# The statuses that are an answer, not a failure: a score, or "this detector does not apply".
ANSWERED_STATUSES = ("ok", "not_applicable")
SCORE_KEY = ["model_id", "model_digest", "detector", "detector_version", "config_hash"]

SCORES = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_digest", pa.string(), nullable=False),
        pa.field("detector", pa.string(), nullable=False),
        pa.field("detector_version", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # one of STATUSES
        pa.field("error", pa.string()),
        pa.field("score", pa.float64()),  # higher = more likely trojaned
        pa.field("predicted_target", pa.int64()),
        pa.field("stats_json", pa.string()),  # named statistics, JSON object
        pa.field("seconds", pa.float64()),
        pa.field("worker", pa.string()),  # node / actor that produced the row
        pa.field("architecture", pa.string()),
        pa.field("num_classes", pa.int64()),
        pa.field("gt_poisoned", pa.bool_()),
        pa.field("gt_target", pa.int64()),
        pa.field("gt_attack", pa.string()),
        pa.field("tags_json", pa.string()),  # free tags of the record (round, dataset, ...)
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"xray_schema_version": SCHEMA_VERSION},
)

TRIGGERS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_digest", pa.string(), nullable=False),
        pa.field("detector", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("trigger_index", pa.int64(), nullable=False),
        pa.field("victim", pa.int64()),  # null = all labels
        pa.field("target", pa.int64()),
        pa.field("kind", pa.string()),  # patch | filter
        pa.field("size", pa.float64()),
        pa.field("reasr", pa.float64()),
        pa.field("stats_json", pa.string()),  # loss summary, steps, seconds, EX-RAY s1/s2/...
        pa.field("mask", pa.binary()),  # np.save bytes, so a trigger can be re-applied and drawn
        pa.field("pattern", pa.binary()),
        pa.field("kernel", pa.binary()),
    ],
    metadata={"xray_schema_version": SCHEMA_VERSION},
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("config_json", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("manifest_uri", pa.string(), nullable=False),  # absolute (xray.results.locations)
        pa.field("manifest_digest", pa.string(), nullable=False),
        pa.field("models_total", pa.int64()),
        pa.field("models_planned", pa.int64()),
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        # the manifest relative to the output folder (null: another filesystem, or written
        # before this column), so a moved or copied output finds it again
        pa.field("manifest_relative", pa.string()),
    ],
    metadata={"xray_schema_version": SCHEMA_VERSION},
)

TABLES = {"scores": SCORES, "triggers": TRIGGERS, "runs": RUNS}
