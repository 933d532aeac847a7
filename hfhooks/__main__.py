"""``python -m hfhooks``: the command line (:mod:`hfhooks.cli`)."""

from hfhooks.cli import main

raise SystemExit(main())
