from batchkin.cli import main

raise SystemExit(main())
