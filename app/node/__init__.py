"""The DICOM node: C-STORE in, analysis, C-STORE out.

    listener (Storage SCP) -> spool (atomic files) -> state (SQLite: studies, jobs, outbox)
        -> completion (sliding quiet period) -> worker (process pool running ``run_batch``)
        -> sender (Storage SCU with retries) -> PACS

Each module does one thing; :mod:`app.node.service` wires them together and
``python -m app serve`` runs it. See ``app/node/README.md`` for the operator's view.
"""
