"""``haif deploy``: a live cluster on machines reached over SSH.

One module per concern: :mod:`~haif.deploy.config` (the deploy YAML and the
plan of which service runs where), :mod:`~haif.deploy.ssh` (asyncssh, host
keys checked against a known-hosts file), :mod:`~haif.deploy.wheels` (the
wheelhouse the hosts install from, no index needed there),
:mod:`~haif.deploy.supervise` (``haif supervise``: the per-service supervisor
that outlives the SSH session), :mod:`~haif.deploy.remote` (what is done on one
host) and :mod:`~haif.deploy.cli` (the commands).
"""
