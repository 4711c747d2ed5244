"""Helpers shared by the test files, imported as ``from helpers.data import make_data``.

pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in pyproject's ``[tool.pytest.ini_options]``),
so the test files import these modules by name and never import one another:

* :mod:`helpers.data`: real data files (Fashion-MNIST, scikit-learn digits, text records).
* :mod:`helpers.servers`: two tiny experts with a router, and ``ddfm serve`` on a loopback port.
* :mod:`helpers.checkpoints`: tiny random-weight checkpoints of every VLM family, built offline.
"""
