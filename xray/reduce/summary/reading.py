"""Reading the scores for a summary: the results reader, one row per SCORE_KEY."""
from __future__ import annotations

from typing import Mapping

import pandas as pd

from xray.reduce.summary.units import with_probability
from xray.results.sink import dedupe_scores, read_table

deduplicate = dedupe_scores  # the name users import from here; the rule lives in results/


def load_scores(out_uri: str, run_id: str | None = None, *, probability: bool = False,
                thresholds: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The de-duplicated `scores` rows under <out>/scores/run=*/ (one run, or all): the results
    reader `xray.results.sink.read_table`, one row per SCORE_KEY (`deduplicate`). No scores:
    an empty frame with the schema's columns. probability=True: with the ``probability`` and
    ``probability_source`` columns after ``score`` (`with_probability`; `thresholds` as in
    `summarize`), computed here, never stored."""
    scores = read_table(out_uri, "scores", run_id=run_id)
    return with_probability(scores, thresholds) if probability else scores
