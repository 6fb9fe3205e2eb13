from quotaflow.cli import main

raise SystemExit(main())
