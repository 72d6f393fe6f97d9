"""python -m authz: the same as the authz command."""

from authz.cli import main

raise SystemExit(main())
