from hfhooks.cli import main

raise SystemExit(main())
