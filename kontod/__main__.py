from kontod.cli import main

raise SystemExit(main())
