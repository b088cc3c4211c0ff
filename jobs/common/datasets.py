"""The datasets of the lake: their folders under the root (docs/contract.md, "The lake").

A plain list of names, so that what imports it (the DAG's sensors through the step contracts)
stays light; every path is built from these by ``jobs.common.lake``.
"""


class Dataset:
    """Dataset folders under the root. Use these names, never literal paths."""

    LANDING = "landing/transactions"
    LANDING_LABELS = "landing/labels"
    CLEAN = "clean/transactions"
    QUARANTINE = "quarantine/transactions"
    CLEAN_LABELS = "clean/labels"
    QUARANTINE_LABELS = "quarantine/labels"
    FEATURES = "features/transactions"
    MODELS = "models"
    SCORES = "scores/transactions"
    ALERTS = "alerts/cards"
    REPORTS = "reports"


# Partitions written in pairs by one run, and the one that commits both. The committing manifest
# embeds its companion's, and a reader of the companion takes the embedded one when the two differ
# (a crash between the two writes): both from the same run, or neither new (jobs.common.lake).
COMMITTED_BY = {
    Dataset.QUARANTINE: Dataset.CLEAN,
    Dataset.QUARANTINE_LABELS: Dataset.CLEAN_LABELS,
    Dataset.SCORES: Dataset.ALERTS,
}

