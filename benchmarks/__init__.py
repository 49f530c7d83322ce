"""Benchmarks of the paraspinal node: ``python -m benchmarks`` (``make bench``).

Scripts that measure and print figures, never timed assertions. Each suite writes its
figures into one JSON document and a markdown table (``benchmarks/results/latest.json`` and
``latest.md`` by default), with the machine they came from (cores, load average before and
after every measurement, torch threads, GPU when present).

Suites (``--suites``):

* ``inference``: per series, network time (MONAI sliding window over the TorchScript UNet)
  and the whole segmentation step (network, inverse resampling, post-processing), CPU and,
  when ``torch.cuda.is_available()``, GPU;
* ``stages``: the pipeline's stage functions in-process on one study (per-stage medians);
* ``e2e``: the real node (``python -m app serve``, short quiet period) and the project's
  archive as PACS: last instance acknowledged -> SEG, SR and PDF acknowledged by the archive,
  minus the quiet period, broken down by stage from ``result.json`` and the node's log events;
  with the node's peak RSS (node + worker processes) while it processes the study;
* ``ingest``: the node's listener against DCMTK ``storescp`` receiving the same series from
  the same ``storescu``, alternately, as a ratio;
* ``concurrency``: 4 senders at once, studies per minute, peak RSS.

See README.md, section "Performance".
"""
