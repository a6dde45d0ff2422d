"""Allow ``python -m nbdserver``."""

from nbdserver.cli import main

raise SystemExit(main())
