"""What the tests share: live clusters, HTTP helpers, PostgreSQL, CLI runners.

Importable from any test module (pytest puts ``tests/`` on ``sys.path``):
``from harness.cluster import LiveCluster``. Fixtures that several modules use
(``session``) are in ``tests/conftest.py``; no test module imports another.
"""
