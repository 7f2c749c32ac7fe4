from tmtseg.cli import main

raise SystemExit(main())
