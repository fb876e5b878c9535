"""The offline batch scorer: `python -m scoring INPUT... --out results.csv|results.jsonl|-` (or `fashion-score`).

Inputs are image files, folders (searched recursively), .npy/.npz arrays and IDX image files (gzipped
or not). They go through the server's own code (service.dataplane's decoding, service.model.Model), in
batches of one Model.run each, without HTTP; or, with --url, through a running server's
/v1/predict/batch; or, with --engine ray, on a Ray cluster (scoring.ray_engine), in the same batches.
One output row per image, written as it is scored; a summary goes to stderr.

True labels come from an IDX label file (--labels, or the standard name beside an IDX image file),
from a .npz's `labels` array, or from folder names (one folder per class, by name or class id).

scoring.inputs finds and reads the inputs and cuts them into units (one model run each), scoring.engines
scores them (scoring.ray_engine on Ray), scoring.outputs writes the rows (CSV, JSON Lines, Parquet) and the
summary, scoring.__main__ is the command.
"""


class UsageError(Exception):
    """Bad arguments: exit 2 with one line."""


class InputError(Exception):
    """One input cannot be read: reported, skipped, and the rest scored."""
