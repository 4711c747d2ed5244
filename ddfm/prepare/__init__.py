"""Stage 1, prepare: turn a real offline source into canonical records (paper §5, data).

    ddfm prepare mix --out data/mix                      # the embedded default (make demo)
    ddfm prepare fashion-mnist --out data/fmnist --train-size 5000 --test-size 1000
    ddfm prepare digits --out data/digits
    ddfm prepare python-docs --out data/docs --max-words 120

The package by job: ``sources`` (the ``SOURCES`` table: what each source builds, the
mix's sizes), ``images`` (Fashion-MNIST and digits pixels, the question/answer tasks of
each image), ``docs`` and ``rst`` (passages of the Python docs' reStructuredText),
``stage`` (:class:`PrepareConfig` and :func:`prepare`: writing the records, the PNGs and
``prepare.json``), ``offline`` (where the sources live, the stable hash seeding every
choice).
"""

from ddfm.prepare.docs import docs_section, docs_test_files
from ddfm.prepare.rst import parse_rst
from ddfm.prepare.sources import SOURCES, build_source
from ddfm.prepare.stage import PrepareConfig, prepare, task_stats

__all__ = ["PrepareConfig", "SOURCES", "build_source", "docs_section", "docs_test_files", "parse_rst", "prepare",
           "task_stats"]
