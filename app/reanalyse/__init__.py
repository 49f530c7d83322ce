"""``python -m app reanalyse``: the pipeline over a whole archive, distributed by Ray.

* :mod:`app.reanalyse.sources`: which studies (QIDO-RS query, study list, folder), spooled to a file;
* :mod:`app.reanalyse.actors`: the Ray actor that holds a loaded model and analyses one study at a time;
* :mod:`app.reanalyse.ledger`: the per-study record of a run (what is done, with its measurements);
* :mod:`app.reanalyse.cohort`: the cohort table (Parquet, CSV) and the failure summary;
* :mod:`app.reanalyse.cli`: the command and its bounded submission loop.
"""
