import sys

from cloudedge.cli import main

sys.exit(main())
