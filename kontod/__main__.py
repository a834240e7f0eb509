from kontod.cli.main import main

raise SystemExit(main())
