"""``python -m haif``: the command line (:func:`haif.cli.main`)."""

from haif.cli import main

# The guard matters: vLLM spawns its engine core, and a spawned child imports
# the parent's ``__main__`` module (as ``__mp_main__``) without running it.
if __name__ == "__main__":
    raise SystemExit(main())
