"""deltakv_tools: what is built on the two packages, not part of them.

The ``deltakv`` command (``cli``), the measurements of the shim (``measure``: quality evaluation, demo,
benchmarks) and the models they and the tests run on (``models``). A program that saves and loads
sessions imports ``deltakv_runtime`` (or ``deltakv_format``) and never this package.
"""
