from dit.cli import main

raise SystemExit(main())
