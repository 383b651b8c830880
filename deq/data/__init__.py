"""Data for deq experiments: word-level corpora, ordered batching, the copy-memory task.

Imports nothing else from :mod:`deq`. The downloader is a separate module,
run as ``python -m deq.data.download NAME --root DIR`` (its function is
:func:`deq.data.download.download_corpus`); it is not imported here so that
running it as a script does not import it twice.
"""

from .batching import Segments, batchify, perplexity
from .copy_memory import CopyMemory, copy_memory_batch, recall_accuracy
from .corpus import CORPORA, Corpus, Vocab, download_command, load_corpus

__all__ = ["CORPORA", "CopyMemory", "Corpus", "Segments", "Vocab", "batchify", "copy_memory_batch",
           "download_command", "load_corpus", "perplexity", "recall_accuracy"]
