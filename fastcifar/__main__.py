import sys

from fastcifar.cli import main

sys.exit(main())
