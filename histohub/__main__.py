import sys

from histohub.cli import main

sys.exit(main())
