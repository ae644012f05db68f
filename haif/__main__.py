from haif.cli import main

raise SystemExit(main())
