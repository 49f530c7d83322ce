"""Reliability and security drivers for the DICOM node.

* :mod:`reliability.harness`: start and stop real peers (the node, the local archive as
  PACS, DCMTK) on free loopback ports, kill them, send studies over several associations,
  and account for every instance and result (used by the tests and the soak run);
* :mod:`reliability.scu`: the one storage SCU (one association from this process, or its
  own process for senders that must run side by side), used by all of the above;
* :mod:`reliability.fuzz`: mutated and malformed DICOM against the receive, spool, index,
  selection and loading path, in-process and over the wire (``python -m reliability.fuzz``);
* :mod:`reliability.soak`: the long run behind ``make soak``: load, repeated crash cycles,
  destination outage, fuzzing, and a summary table.
"""
