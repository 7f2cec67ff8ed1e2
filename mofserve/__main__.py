from mofserve.cli import main

raise SystemExit(main())
