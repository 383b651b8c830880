"""The training side of deq: Hydra entry points over an importable training loop.

``python experiments/train.py [key=value ...]`` is the command line (see
``--help``); everything it does is importable once the project is installed
(``pip install -e .``), e.g. ``from experiments.train import train``. The
pieces, in the order data flows through them:

* :mod:`experiments.config`: checks a composed config before any work;
* :mod:`experiments.tasks`: the task protocol and its two implementations
  (language modelling, copy memory), built by ``_target_`` from ``configs/data``;
* :mod:`experiments.schedules`: learning-rate schedules, built by ``_target_``;
* :mod:`experiments.state`: the typed training state (step, data position,
  carried memory, counters, log accumulators, RNG);
* :mod:`experiments.step`: one optimisation step (precision, Jacobian
  regularisation, the non-finite guard);
* :mod:`experiments.evaluation`: a whole split with memory carried;
* :mod:`experiments.checkpoint`: verified checkpoints, atomic writes;
* :mod:`experiments.logs`: ``metrics.jsonl``, TensorBoard, the progress line;
* :mod:`experiments.distributed`: torchrun / DistributedDataParallel helpers;
* :mod:`experiments.loop`: the loop that ties them together;
* :mod:`experiments.plots`: learning curves and solver convergence.

Nothing here is imported by :mod:`deq`, which never imports Hydra.
"""
